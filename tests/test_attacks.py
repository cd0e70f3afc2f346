import pytest
import torch
import torch.nn.functional as F

from agft_core.attacks import apgd_ce, autoattack, cw_margin_loss, pgd
from agft_core.evaluate import robust_outcomes


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 8, 8, generator=g)
    x[:4] = 0.0  # images on the box's faces: projection must clamp to [0, 1]
    x[4:8] = 1.0
    return x


def test_pgd_stays_in_the_eps_ball_and_the_box():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 5))
    x, y = _batch(), torch.arange(16) % 5
    eps = 8 / 255
    x_adv = pgd(lambda z: F.cross_entropy(model(z), y), x, eps, 2 / 255, steps=10)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    assert not torch.equal(x_adv, x)


def test_pgd_raises_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    x, y = _batch(), torch.arange(16) % 5

    def loss(z):
        return F.cross_entropy(model(z), y)

    x_adv = pgd(loss, x, 4 / 255, 1 / 255, steps=5)
    assert loss(x_adv).item() > loss(x).item()


def test_pgd_on_a_linear_loss_reaches_the_closed_form_worst_case():
    # max_{|δ|∞ ≤ ε, x+δ ∈ [0,1]} w·(x+δ) is attained at clip(x + ε·sign(w), 0, 1).
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1, 3, 8, 8, generator=g)
    x = torch.rand(4, 3, 8, 8, generator=g) * 0.98 + 0.01
    eps = 2 / 255
    x_adv = pgd(lambda z: (z * w).sum(), x, eps, eps / 2, steps=4, random_start=False)
    assert torch.allclose(x_adv, (x + eps * w.sign()).clamp(0, 1), atol=1e-6)


def test_pgd_runs_in_fp32_even_under_autocast():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 5))
    x, y = _batch(), torch.arange(16) % 5
    seen = []

    def loss(z):
        logits = model(z)
        seen.append(logits.dtype)
        return F.cross_entropy(logits, y)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # autocast is really on out here
        x_adv = pgd(loss, x, 4 / 255, 1 / 255, steps=3)
    assert seen == [torch.float32] * 3 and x_adv.dtype == torch.float32


def test_pgd_on_a_linear_classifier_reaches_x_minus_eps_sign_w_of_the_true_class():
    # Two classes, logits W x: CE's input gradient is p_other · (w_other − w_true), so the worst
    # case in the box is x − ε·sign(w) with w = w_true − w_other.
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(2, 48, generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2, bias=False))
    model[1].weight.data.copy_(weight)
    x = torch.rand(6, 3, 4, 4, generator=g) * 0.9 + 0.05
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    eps = 3 / 255
    x_adv = pgd(lambda z: F.cross_entropy(model(z), y), x, eps, eps, steps=3, random_start=False)
    w = (weight[y] - weight[1 - y]).view(6, 3, 4, 4)
    assert torch.allclose(x_adv, (x - eps * w.sign()).clamp(0, 1), atol=1e-6)


def test_cw_margin_loss_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, -1.0]])
    labels = torch.tensor([0, 2])
    assert cw_margin_loss(logits, labels).item() == pytest.approx(((2.5 - 3.0) + (4.0 - (-1.0))) / 2)


@pytest.fixture(scope="module")
def trained_mlp():
    """A small classifier of five nearby clusters: clean accuracy is high and ε = 8/255 can still attack it."""
    g = torch.Generator().manual_seed(0)
    centres = 0.5 + 0.1 * (torch.rand(5, 3, 8, 8, generator=g) - 0.5)
    y = torch.arange(100) % 5
    x = (centres[y] + 0.05 * torch.randn(100, 3, 8, 8, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def test_accuracy_never_rises_as_the_attack_gets_stronger(trained_mlp):
    model, x, y = trained_mlp
    eps = 8 / 255

    def ce(z):
        return F.cross_entropy(model(z), y)

    def g():
        return torch.Generator().manual_seed(1)

    results = {
        "clean": _accuracy(model, x, y),
        "pgd2": _accuracy(model, pgd(ce, x, eps, eps / 2, 2, generator=g()), y),
        "pgd20": _accuracy(model, pgd(ce, x, eps, eps / 8, 20, generator=g()), y),
        "cw20": _accuracy(model, pgd(lambda z: cw_margin_loss(model(z), y), x, eps, eps / 8, 20, generator=g()), y),
        "apgd_ce5": _accuracy(model, apgd_ce(model, x, y, eps, 5), y),
        "apgd_ce50": _accuracy(model, apgd_ce(model, x, y, eps, 50, restarts=2), y),
        "autoattack": _accuracy(model, autoattack(model, x, y, eps, version="standard", batch_size=100), y),
    }
    assert results["clean"] >= 0.9, results
    assert results["clean"] >= results["pgd2"] >= results["pgd20"] >= results["autoattack"], results
    assert results["clean"] >= results["apgd_ce5"] >= results["apgd_ce50"] >= results["autoattack"], results
    assert results["autoattack"] <= results["cw20"], results
    assert results["pgd20"] < results["pgd2"] < results["clean"], results  # the attacks bite at this ε


@pytest.mark.parametrize("version", ["standard", "rand"])
def test_autoattack_stays_inside_the_eps_ball_and_the_box(trained_mlp, version):
    model, x, y = trained_mlp
    eps = 4 / 255
    x_adv = autoattack(model, x[:20], y[:20], eps, version=version, batch_size=20)
    assert (x_adv - x[:20]).abs().max().item() <= eps + 1e-6
    assert 0 <= x_adv.min().item() and x_adv.max().item() <= 1


def test_autoattack_on_two_classes_runs_without_its_targeted_dlr_attack(trained_mlp):
    model, x, y = trained_mlp
    two = torch.nn.Sequential(model, torch.nn.Linear(5, 2))
    x_adv = autoattack(two, x[:8], y[:8] % 2, 8 / 255, batch_size=8)
    assert (x_adv - x[:8]).abs().max().item() <= 8 / 255 + 1e-6
    assert _accuracy(two, x_adv, y[:8] % 2) <= _accuracy(two, apgd_ce(two, x[:8], y[:8] % 2, 8 / 255, 5), y[:8] % 2)
    with pytest.raises(ValueError, match="rand version needs the DLR loss, hence at least 4 classes; this task has 2"):
        autoattack(two, x[:4], y[:4] % 2, 4 / 255, version="rand")


def test_apgd_ce_stays_in_the_ball_leaves_the_random_state_alone_and_restarts_only_help(trained_mlp):
    model, x, y = trained_mlp
    eps = 8 / 255  # where the attacks bite (test above)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    x_adv = apgd_ce(model, x, y, eps, 10, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)  # pyautoattack reseeds the global generator
    assert (x_adv - x).abs().max().item() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert torch.equal(x_adv, apgd_ce(model, x, y, eps, 10, seed=7))  # seeded: the same images
    one, three = (_accuracy(model, apgd_ce(model, x, y, eps, 10, restarts=r, seed=7), y) for r in (1, 3))
    assert three <= one < _accuracy(model, x, y)


def test_both_robust_counts_by_hand():
    clean_ok = torch.tensor([True, False, True, False])
    adv_ok = torch.tensor([True, True, False, False])  # image 1: wrong clean, right once attacked
    counts = {k: int(v.sum()) for k, v in robust_outcomes(clean_ok, adv_ok).items()}
    assert counts == {"clean": 2, "attacked": 2, "clean_and_attacked": 1}
