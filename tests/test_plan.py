"""`agft plan`: each stage's work and time from FLOPs, checked by hand on a tiny config."""

import pytest

from pipeline.cli import main
from pipeline.config.loading import load_config
from pipeline.plan import Assumptions, forward_flops, table

TINY = [
    "train.method=agft",
    "calibration.gamma=0.5",
    "data.train.limit=100",
    "train.epochs=2",
    "train.attack.steps=2",
    "train.validation=null",
    "data.zero_shot=[{name: colours, limit: 50}]",
    "eval.attack={name: pgd, eps: 1/255, alpha: 1/255, steps: 20}",
    "eval.quick=null",
]


def test_each_stage_by_hand():
    """1 GFLOP an image, 2 GPUs of 1 TFLOP/s at 50 % MFU, 4 CPUs per GPU decoding 10 images/s each."""
    rows = {r["stage"]: r for r in table(load_config(None, TINY), 1e9, Assumptions(2, 1.0, 0.5, 4, 10))}
    assert list(rows) == ["teacher cache", "train", "eval", "total"]
    # the teacher cache: 100 images, one forward each; 0.2 GPU-s against 100 / 40 = 2.5 s of decoding
    assert (rows["teacher cache"]["images"], rows["teacher cache"]["passes/image"]) == (100, 1)
    assert rows["teacher cache"]["PFLOP"] == pytest.approx(1e11 / 1e15)
    assert rows["teacher cache"]["bound by"] == "CPU decoding"
    assert rows["teacher cache"]["wall hours"] == pytest.approx(2.5 / 2 / 3600)
    # training: 2 epochs x 100 images, each 2 attack steps + the student's step, a forward and backward each
    assert (rows["train"]["images"], rows["train"]["passes/image"]) == (200, 9)
    assert rows["train"]["GPU-hours"] == pytest.approx(200 * 9 * 1e9 / 0.5e12 / 3600)  # 3.6 s
    assert rows["train"]["wall hours"] == pytest.approx(200 / 40 / 2 / 3600)  # decoding, 5 s over 2 GPUs
    # evaluation: 2 models x 50 images under PGD-20: 2 predictions + 20 gradient steps = 62 passes; 12.4 GPU-s
    assert (rows["eval"]["images"], rows["eval"]["passes/image"]) == (100, 62)
    assert rows["eval"]["bound by"] == "GPU"
    assert rows["eval"]["wall hours"] == pytest.approx(100 * 62 * 1e9 / 0.5e12 / 2 / 3600)
    total = rows["total"]
    assert total["GPU-hours"] == pytest.approx(sum(rows[s]["GPU-hours"] for s in ("teacher cache", "train", "eval")))


def test_a_method_without_the_teacher_cache_plans_none_and_fare_pays_the_frozen_forward():
    fare = {
        r["stage"]: r for r in table(load_config(None, TINY + ["train.method=fare"]), 1e9, Assumptions(1, 1, 1, 1, 1))
    }
    assert "teacher cache" not in fare and fare["train"]["passes/image"] == 10


def test_the_vit_b_32_forward_is_counted_with_its_attention_projections():
    """ViT-B/32 at 224 px by hand, 2 FLOPs a multiply-add: 49 patches + the class token through 12 layers of
    width 768 (q, k, v, out: 4 x 768^2; MLP 2 x 768 x 3072), the attention's two token-by-token products, and the
    patch embedding (a 32 x 32 x 3 -> 768 projection per patch). Under no_grad the fused attention kernel would hide
    the q, k, v projections from the counter, a quarter of the whole."""
    tokens, width, layers = 50, 768, 12
    matmuls = layers * (4 * width**2 + 2 * width * 4 * width)
    attention = layers * 2 * tokens**2 * width
    patches = 49 * 32 * 32 * 3 * width
    expected = 2 * (tokens * matmuls + attention + patches)
    assert forward_flops(load_config("vitb32_imagenet")) == pytest.approx(expected, rel=0.02)


def test_plan_needs_a_gpu_count_for_auto_workers(capsys):
    assert main(["plan", "--config", "vitb32_imagenet"]) == 2
    assert "train.num_workers is auto: give --gpus" in capsys.readouterr().err
