"""CLIP models: open_clip creation and loading, the pixel-space image encoder, zero-shot heads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.transformer import QuickGELU
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from agft_core.cache import local_path
from agft_core.catalog import EMBEDDED_ARCH_DIR, is_weights_file
from agft_core.errors import InputError

RANDOM_INIT_SEED = 0


def register_embedded_architectures() -> None:
    # open_clip keeps its own registry of architectures; ours must be in it before create_model.
    open_clip.add_model_config(EMBEDDED_ARCH_DIR)


def create_clip(arch: str, weights: str | None, init_seed: int | None = RANDOM_INIT_SEED) -> nn.Module:
    """An open_clip model in eval mode.

    weights: None for an explicit random init, a local weights file, or an open_clip
    pretrained tag (e.g. 'openai') resolved from the local open_clip / Hugging Face cache.
    A .safetensors file saved by save_weights carries the network it was saved from (the architecture's
    config with its activation) and is rebuilt as that network: an OpenAI-based model stays QuickGELU.
    init_seed: what the random init is drawn from, without touching the caller's random state, so
    that every task and worker that builds `weights: random` builds the same network; None draws
    from the caller's state.
    """
    register_embedded_architectures()
    if weights is None or is_weights_file(weights):
        saved = saved_network(weights, arch) if weights is not None else {}
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly" before we load the file
        try:
            with torch.random.fork_rng(enabled=init_seed is not None):
                if init_seed is not None:
                    torch.manual_seed(init_seed)
                model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=bool(saved.get("quick_gelu")))
        finally:
            logging.disable(logging.NOTSET)
        if weights is not None:
            load_weights(model, weights)
    else:
        if cached_pretrained(arch, weights) is None:
            raise FileNotFoundError(missing_pretrained_message(arch, weights))
        # OpenAI's checkpoints were trained with QuickGELU; open_clip builds GELU for e.g. ViT-B-32 and
        # only warns, which would shift every number those weights give.
        quick_gelu = bool(open_clip.get_pretrained_cfg(arch, weights).get("quick_gelu"))
        model = open_clip.create_model(arch, pretrained=weights, require_pretrained=True, force_quick_gelu=quick_gelu)
    return model.eval()


NETWORK_KEY = "open_clip_model_cfg"  # the safetensors metadata entry save_weights writes the network to


def uses_quick_gelu(module: nn.Module) -> bool:
    return any(isinstance(m, QuickGELU) for m in module.modules())


def network_config(arch: str, module: nn.Module) -> dict:
    """What rebuilds `module`'s network: its architecture's open_clip config, with the activation it was built
    with (open_clip's configs leave QuickGELU out for the OpenAI-tagged models)."""
    register_embedded_architectures()
    return {**open_clip.get_model_config(arch), "quick_gelu": uses_quick_gelu(module)}


def saved_network(location: str, arch: str) -> dict:
    """The network config a weights file was saved with ({} for files without one: other tools' files, and
    torch pickles). A file saved from another architecture, or from another version of its config, is an
    InputError: its weights would load into a different network."""
    path = local_path(location)
    if not path.endswith(".safetensors") or not Path(path).is_file():
        return {}
    try:
        saved_arch, saved = _saved_metadata(path)
    except Exception:  # noqa: BLE001 - not a safetensors file at all: load_weights says so
        return {}
    if not saved:
        return {}
    register_embedded_architectures()
    expected = {**open_clip.get_model_config(arch), "quick_gelu": saved.get("quick_gelu", False)}
    saved_arch = saved_arch or arch
    if saved_arch != arch:
        raise InputError(
            f"{location} was saved from architecture {saved_arch}, not model.arch {arch}; set "
            f"model.arch to {saved_arch}"
        )
    if saved != expected:
        raise InputError(
            f"{location} was saved from another version of {arch}'s open_clip config than this "
            f"install's; load it with the open_clip version that saved it"
        )
    return saved


def cached_pretrained(arch: str, tag: str) -> str | None:
    """The local file open_clip would load for (arch, tag): from the Hugging Face cache, or from
    open_clip's URL cache ~/.cache/clip. None when it is not there; nothing is downloaded."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    model_id, filename = os.path.split(cfg.get("hf_hub", ""))
    if model_id:
        for name in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(model_id, name)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    return None


def missing_pretrained_message(arch: str, tag: str) -> str:
    return (
        f"pretrained weights {tag!r} for {arch} are not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}) "
        f"or ~/.cache/clip; fetch them once where there is network access, or set model.weights to a "
        f"local weights file"
    )


def load_weights(model: nn.Module, location: str) -> None:
    """Loads a local weights file, or one at a URI (e.g. a fine-tuned encoder in a shared cache)."""
    path = local_path(location)
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            _check_activation(model, location, path)
            state = load_file(path)
        else:
            # weights_only: a pickle that would run code (or build anything but tensors) is refused
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    except InputError:
        raise
    except pickle.UnpicklingError:
        raise InputError(
            f"{location}: refused, its pickle holds code or objects other than tensors (loaded with "
            f"torch.load(weights_only=True)); convert it to .safetensors where you trust it"
        ) from None
    except Exception as exc:  # noqa: BLE001 - safetensors, format and shape errors alike mean bad weights
        # load_state_dict's first line only says "Error(s) in loading state_dict"; the next names a tensor
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0]
        raise InputError(f"{location} is not a weights file of this architecture ({reason[:300]})") from None


def _saved_metadata(path: str) -> tuple[str | None, dict]:
    """(the architecture, the network config) save_weights wrote into a safetensors file; None and {} where
    another tool saved it."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return metadata.get("arch"), json.loads(metadata.get(NETWORK_KEY, "{}"))


def _check_activation(model: nn.Module, location: str, path: str) -> None:
    """Weights trained in a QuickGELU network (OpenAI's) load into a GELU one without an error, and compute
    something else there: refused."""
    _, saved = _saved_metadata(path)
    if "quick_gelu" in saved and saved["quick_gelu"] != uses_quick_gelu(model):
        activations = {True: "QuickGELU", False: "GELU"}
        raise InputError(
            f"{location} holds the weights of a {activations[saved['quick_gelu']]} network, and the "
            f"model they would load into is {activations[not saved['quick_gelu']]}; start from the "
            f"model.weights these weights were trained from"
        )


def save_weights(module: nn.Module, path: Path, arch: str) -> None:
    """module's tensors, with what rebuilds its network (network_config) in the file's metadata."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"arch": arch, NETWORK_KEY: json.dumps(network_config(arch, module))})


def state_digest(module: nn.Module) -> str:
    """A content hash of every tensor in the module and of its activation: the fingerprint of the network that
    computes with those weights (GELU and QuickGELU towers with the same weights compute differently)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if uses_quick_gelu(module):  # only then: the digests of GELU networks, and the caches keyed by them, stand
        h.update(b"quick_gelu")
    return h.hexdigest()


def preprocess_cfg(model: nn.Module) -> dict:
    """The model's own image size and normalisation, kept with anything derived from it."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]  # open_clip gives ViTs a (h, w) pair and ResNets a single int
    return {
        "size": [size, size] if isinstance(size, int) else list(size),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg["interpolation"],
        "resize_mode": cfg["resize_mode"],
    }


def input_size(arch: str) -> int:
    """The side of the image tower's input, from the architecture's config: known before any weights load."""
    register_embedded_architectures()
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def logit_scale(model: nn.Module) -> float:
    return float(model.logit_scale.exp().item())


class ImageEncoder(nn.Module):
    """Pixels in [0, 1] to an L2-normalised embedding.

    Normalisation lives inside the module so that every attack perturbs raw pixels and
    its ε-ball and [0, 1] box mean what they say. So does resizing: images smaller than the
    model's input (CIFAR at 32 px) are attacked at their own resolution, as the paper does, and
    upsampled here, differentiably.
    """

    def __init__(self, visual: nn.Module, mean, std, size: int, interpolation: str = "bicubic"):
        super().__init__()
        self.visual, self.size, self.interpolation = visual, size, interpolation
        # on the tower's device: an encoder built from a CLIP already on a GPU is whole there
        device = next(visual.parameters()).device
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_clip(cls, model: nn.Module) -> ImageEncoder:
        cfg = preprocess_cfg(model)
        return cls(model.visual, cfg["mean"], cfg["std"], cfg["size"][0], cfg["interpolation"])

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels at the model's size."""
        if pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            pixels = F.interpolate(
                pixels,
                size=(self.size, self.size),
                mode=self.interpolation,
                align_corners=False,
                antialias=pixels.shape[-1] > self.size,
            ).clamp(0, 1)
        return (pixels - self.mean) / self.std

    def forward(self, pixels: torch.Tensor, output: str = "embedding"):
        """output: "embedding" (L2-normalised), "features" (unnormalised, as FARE compares them), or
        "tokens" (the normalised embedding and the normalised, projected patch tokens, for TGA-ZSR)."""
        x = self.model_input(pixels)
        if output == "tokens":
            if getattr(self.visual, "proj", None) is None or not hasattr(self.visual, "output_tokens"):
                raise ValueError(
                    f"patch tokens need a ViT image tower with a projection, not {type(self.visual).__name__}"
                )
            self.visual.output_tokens = True
            try:
                pooled, tokens = self.visual(x)
            finally:
                self.visual.output_tokens = False
            return F.normalize(pooled, dim=-1), F.normalize(tokens @ self.visual.proj, dim=-1)
        features = self.visual(x)
        return features if output == "features" else F.normalize(features, dim=-1)


@torch.no_grad()
def class_text_embeddings(model: nn.Module, arch: str, classnames, templates) -> torch.Tensor:
    """[classes, dim] L2-normalised text embeddings, averaged over the templates."""
    tokenizer = open_clip.get_tokenizer(arch)
    device = next(model.parameters()).device
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device)
    return weights.T.contiguous()
