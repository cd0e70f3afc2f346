"""The fine-tune's learning-rate schedule against its formula, computed by hand: (s + 1) / w over the
warm-up, then 0.5 (1 + cos(π (s − w) / (T − w)))."""

import math

import pytest
import torch

from agft_core.optim import warmup_cosine


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
