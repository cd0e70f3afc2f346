import torch
import torch.nn.functional as F

from agft_core.attacks import pgd

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
    loss = lambda z: F.cross_entropy(model(z), y)
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
