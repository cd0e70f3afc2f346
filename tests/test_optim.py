"""The fine-tune's learning-rate schedule against its formula, computed by hand: (s + 1) / w over the
warm-up, then 0.5 (1 + cos(π (s − w) / (T − w)))."""

import math
from pathlib import Path

import pytest
import torch

from agft_core.optim import compress_gradients, warmup_cosine


def by_hand(step: int, warmup: int, total: int) -> float:
    warmup = min(warmup, total)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@pytest.mark.parametrize("warmup, total", [(10, 100), (1, 30), (0, 12), (3, 3), (50, 20)])
def test_schedule_follows_the_formula_and_resumes_from_its_state(warmup, total):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = warmup_cosine(optimizer, warmup, total)
    for step in range(total + 1):  # the last: after the final update
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * by_hand(step, warmup, total), abs=1e-12)
        optimizer.step()
        schedule.step()
        if step == total // 2:  # a resumed run continues where the checkpoint left off (train_loop's order)
            resumed = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            again = warmup_cosine(resumed, warmup, total)
            resumed.load_state_dict(optimizer.state_dict())
            again.load_state_dict(schedule.state_dict())
            optimizer, schedule = resumed, again


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, as DDP needs one."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("compression", ["off", "bf16"])
def test_ddp_all_reduces_the_gradients_in_the_format_asked_for(process_group, compression):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(8, 4), torch.randn(16, 8) * 1.3
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    reference(x).pow(2).sum().backward()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert compress_gradients(ddp, compression) is (compression == "bf16")
    ddp(x).pow(2).sum().backward()
    exact = reference.weight.grad
    expected = exact.bfloat16().float() if compression == "bf16" else exact
    assert torch.equal(model.weight.grad, expected) and torch.equal(expected, exact) is (compression == "off")


def test_one_worker_without_ddp_has_no_gradients_to_compress():
    assert not compress_gradients(torch.nn.Linear(2, 2), "bf16")


def test_a_checkpoint_keeps_fp16s_loss_scale_and_a_resumed_run_starts_from_it(monkeypatch):
    """GradScaler's scale halves on each overflowing step; a run resumed without it would start again from 2^16 and
    skip steps finding the scale anew. CPU scalers compute the same arithmetic as CUDA's."""
    import ray.train

    from pipeline.checkpoints import STATE_FILE
    from pipeline.train import Trainee, _report_with_checkpoint, restore

    def parts():
        encoder = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
        return encoder, optimizer, warmup_cosine(optimizer, 1, 10), torch.amp.GradScaler("cpu", init_scale=2.0**16)

    encoder, optimizer, schedule, scaler = parts()
    for _ in range(3):  # three overflows: 2^16 -> 2^13
        scaler.scale(encoder(torch.full((1, 4), math.inf)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    trainee = Trainee(encoder, encoder, None, optimizer, schedule, scaler, torch.zeros(2, 4), None)
    saved = {}

    def report(metrics, checkpoint):
        saved.update(torch.load(Path(checkpoint.path) / STATE_FILE, weights_only=True))

    monkeypatch.setattr(ray.train, "report", report)
    _report_with_checkpoint(trainee, "agft-tiny-vit", 0, [{"epoch": 1}], {"epoch": 1})
    resumed = parts()
    assert restore(saved, *resumed) == (1, [{"epoch": 1}])
    assert resumed[3].get_scale() == 2.0**13
