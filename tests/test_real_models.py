"""The real model path: open_clip architectures at 224 px, random init, a local weights file and
a pretrained tag resolved from a (generated) local Hugging Face cache, through train and eval."""
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from agft_core.evaluate import zero_shot_accuracy
from agft_core.methods import adversarial_step, build_method
from agft_core.model import ImageEncoder, class_text_embeddings, create_clip, logit_scale, preprocess_cfg, \
    state_digest
from pipeline.config import AttackConfig, ConfigError, load_config, preflight


@pytest.mark.parametrize("arch,method", [("ViT-B-32", "tga_zsr"), ("RN50", "agft")])
def test_random_init_model_from_a_weights_file_trains_and_evaluates(tmp_path, arch, method):
    torch.manual_seed(0)
    reference = create_clip(arch, None)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": reference.state_dict()}, path)  # a torch checkpoint, loaded weights_only
    clip = create_clip(arch, str(path))
    assert state_digest(clip) == state_digest(reference)
    size = preprocess_cfg(clip)["size"][0]
    assert size == 224
    text = class_text_embeddings(clip, arch, ["cat", "dog", "truck"], ["a photo of a {}."])
    student, frozen = ImageEncoder.from_clip(clip), ImageEncoder.from_clip(create_clip(arch, str(path))).eval()
    frozen.requires_grad_(False)
    x, y = torch.rand(2, 3, size, size), torch.tensor([0, 2])
    with torch.no_grad():
        cached = frozen(x)
    chosen = build_method(method, text, logit_scale(clip), gamma=0.4, inv_tau=180.0, teacher=frozen,
                          alpha=0.08, beta=0.05)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    loss, _ = adversarial_step(student, student, chosen, x, y, cached, AttackConfig(eps=1 / 255, alpha=1 / 255, steps=1),
                               "bf16", torch.optim.SGD(student.parameters(), lr=1e-4),
                               torch.amp.GradScaler("cpu", enabled=False))
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    scores = zero_shot_accuracy(student, text, logit_scale(clip), TensorDataset(x, y), eps=1 / 255, alpha=1 / 255,
                                steps=1, batch_size=2)
    assert scores["n"] == 2 and set(scores) == {"clean", "attacked", "clean_and_attacked", "n"}


def _fake_hf_cache(root, repo: str, state: dict) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    revision = "0" * 40
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / revision / "open_clip_model.safetensors")


def test_pretrained_tag_resolves_from_the_local_cache_and_a_missing_one_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))  # and no ~/.cache/clip
    cfg = load_config(None, ["model.arch=RN50", "model.weights=openai"])
    with pytest.raises(ConfigError, match=r"model.weights: pretrained weights 'openai' for RN50 are not in the "
                                          r"local Hugging Face cache"):
        preflight(cfg)
    torch.manual_seed(1)
    reference = create_clip("RN50", None)
    _fake_hf_cache(tmp_path / "hub", "timm/resnet50_clip.openai", reference.state_dict())
    preflight(cfg)
    assert state_digest(create_clip("RN50", "openai")) == state_digest(reference)


def test_openai_weights_build_quickgelu_towers_and_a_weights_file_keeps_the_config(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from open_clip.transformer import QuickGELU

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    reference = create_clip("ViT-B-32", None)
    _fake_hf_cache(tmp_path / "hub", "timm/vit_base_patch32_clip_224.openai", reference.state_dict())
    openai = create_clip("ViT-B-32", "openai")
    for tower in (openai.visual.transformer, openai.transformer):
        assert all(isinstance(block.mlp.gelu, QuickGELU) for block in tower.resblocks)
    assert state_digest(openai) == state_digest(reference)
    assert type(reference.visual.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU


def test_random_init_is_the_same_network_everywhere_and_leaves_the_callers_random_state():
    """`weights: random` is built in many processes (describe, teacher cache, each train rank, each eval task):
    all must build the same network, or the 'teacher' differs from task to task."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = state_digest(create_clip("agft-tiny-vit", None))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    torch.manual_seed(456)
    assert state_digest(create_clip("agft-tiny-vit", None)) == first
    assert state_digest(create_clip("agft-tiny-vit", None, init_seed=1)) != first
