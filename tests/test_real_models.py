"""The real model path: open_clip architectures at 224 px, random init, a local weights file and
a pretrained tag resolved from a (generated) local Hugging Face cache, through train and eval."""

import io

import mlflow
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from agft_core.datasets import pixel_transform
from agft_core.errors import InputError
from agft_core.evaluate import zero_shot_accuracy
from agft_core.methods import adversarial_step, build_method
from agft_core.model import (
    ImageEncoder,
    class_text_embeddings,
    create_clip,
    load_weights,
    logit_scale,
    preprocess_cfg,
    save_weights,
    state_digest,
)
from pipeline.config.checks import preflight
from pipeline.config.loading import load_config
from pipeline.config.sections import AttackConfig, ConfigError


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
    chosen = build_method(
        method, text, logit_scale(clip), gamma=0.4, inv_tau=180.0, teacher=frozen, alpha=0.08, beta=0.05
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    loss, _ = adversarial_step(
        student,
        student,
        chosen,
        x,
        y,
        cached_teacher=cached,
        attack=AttackConfig(eps=1 / 255, alpha=1 / 255, steps=1),
        amp="bf16",
        optimizer=torch.optim.SGD(student.parameters(), lr=1e-4),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
    )
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    scores = zero_shot_accuracy(
        student, text, logit_scale(clip), TensorDataset(x, y), eps=1 / 255, alpha=1 / 255, steps=1, batch_size=2
    )
    assert scores["n"] == 2 and set(scores) == {"clean", "attacked", "clean_and_attacked", "n"}


def _fake_hf_cache(root, repo: str, state: dict) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    revision = "0" * 40
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / revision / "open_clip_model.safetensors"
    )


def test_pretrained_tag_resolves_from_the_local_cache_and_a_missing_one_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))  # and no ~/.cache/clip
    cfg = load_config(None, ["model.arch=RN50", "model.weights=openai"])
    with pytest.raises(
        ConfigError,
        match=r"model.weights: pretrained weights 'openai' for RN50 are not in the "
        r"local Hugging Face cache",
    ):
        preflight(cfg)
    torch.manual_seed(1)
    reference = create_clip("RN50", None)
    _fake_hf_cache(tmp_path / "hub", "timm/resnet50_clip.openai", reference.state_dict())
    preflight(cfg)
    assert _same_weights(create_clip("RN50", "openai"), reference)


def test_openai_weights_build_quickgelu_towers_and_a_weights_file_keeps_the_config(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from open_clip.transformer import QuickGELU

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    reference = create_clip("ViT-B-32", None)
    _fake_hf_cache(tmp_path / "hub", "timm/vit_base_patch32_clip_224.openai", reference.state_dict())
    openai = create_clip("ViT-B-32", "openai")
    for tower in (openai.visual.transformer, openai.transformer):
        assert all(isinstance(block.mlp.gelu, QuickGELU) for block in tower.resblocks)
    assert _same_weights(openai, reference)
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


def test_an_openai_model_saved_to_a_file_is_rebuilt_quickgelu_by_every_path_that_loads_it(tmp_path, monkeypatch):
    """ViT-B-32 + openai (QuickGELU) saved by save_weights, then rebuilt: from the file (every task given
    model.weights=<file>, e.g. `agft eval`), as the registered pyfunc model, and a fine-tuned image encoder
    evaluated later. Each computes the original's logits; the encoder refuses a GELU teacher."""
    import pandas as pd
    from huggingface_hub import constants
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipeline import registry

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.manual_seed(2)
    _fake_hf_cache(
        tmp_path / "hub", "timm/vit_base_patch32_clip_224.openai", create_clip("ViT-B-32", None).state_dict()
    )
    openai = create_clip("ViT-B-32", "openai")
    image = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())
    png = io.BytesIO()
    image.save(png, format="PNG")
    pixels = pixel_transform(224)(image)[None]
    classnames, templates = ["cat", "dog", "truck"], ["a photo of a {}."]

    def logits(clip, encoder=None):
        with torch.no_grad():
            text = class_text_embeddings(clip, "ViT-B-32", classnames, templates)
            return logit_scale(clip) * (encoder or ImageEncoder.from_clip(clip))(pixels) @ text.T

    expected = logits(openai)
    # the activation matters for these weights: the test can tell the two networks apart
    assert not torch.allclose(expected, logits(_gelu_twin(openai)), atol=1e-4)

    # 1. model.weights=<file>: what every task builds
    path = tmp_path / "clip.safetensors"
    save_weights(openai, path, "ViT-B-32")
    rebuilt = create_clip("ViT-B-32", str(path))
    torch.testing.assert_close(logits(rebuilt), expected, rtol=1e-5, atol=1e-5)
    assert state_digest(rebuilt) == state_digest(openai) != state_digest(_gelu_twin(openai))

    # 2. the registered pyfunc model
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("agft", (tmp_path / "mlruns").as_uri())).info.run_id
    version = registry.register(
        uri,
        run_id,
        "agft",
        registry.ServableClip(str(path), "ViT-B-32", classnames, templates, png.getvalue()),
        {"role": registry.ORIGINAL},
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    served = mlflow.pyfunc.load_model(f"models:/agft/{version.version}")
    probabilities = served.predict(pd.DataFrame({"image": [png.getvalue()]}), params={"classnames": classnames})
    torch.testing.assert_close(
        torch.tensor(probabilities.to_numpy(), dtype=torch.float32), expected.softmax(-1), rtol=1e-5, atol=1e-5
    )

    # 3. a fine-tuned image encoder, evaluated later on the teacher it was trained from
    tuned = ImageEncoder.from_clip(create_clip("ViT-B-32", "openai"))
    with torch.no_grad():
        tuned.visual.proj.mul_(1.5)
    encoder_file = tmp_path / "image_encoder.safetensors"
    save_weights(tuned, encoder_file, "ViT-B-32")
    reloaded = ImageEncoder.from_clip(create_clip("ViT-B-32", "openai"))
    load_weights(reloaded, str(encoder_file))
    torch.testing.assert_close(logits(openai, reloaded), logits(openai, tuned), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="weights of a QuickGELU network, and the model they would load into is GELU"):
        load_weights(ImageEncoder.from_clip(create_clip("ViT-B-32", None)), str(encoder_file))


def _same_weights(a, b) -> bool:
    """Equal tensors, whatever the activation (state_digest tells QuickGELU networks apart)."""
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items()
    )


def _gelu_twin(clip):
    """The same weights in open_clip's default (GELU) ViT-B-32."""
    twin = create_clip("ViT-B-32", None)
    twin.load_state_dict(clip.state_dict())
    return twin


def test_an_image_encoder_is_built_on_its_towers_device():
    """A CLIP moved to a GPU, then wrapped (as the served model does): its normalisation too is on that device, else
    every request would mix a CUDA tensor with CPU ones. The meta device stands in for the GPU here."""
    clip = create_clip("agft-tiny-vit", None).to("meta")
    encoder = ImageEncoder.from_clip(clip)
    assert {t.device.type for t in [*encoder.parameters(), *encoder.buffers()]} == {"meta"}
