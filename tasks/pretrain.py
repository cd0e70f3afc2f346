"""The pretrain stage's task: the embedded teacher, contrastively pretrained on the built-in world."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray

from agft_core import world
from agft_core.cache import describe_file, join, upload
from agft_core.model import save_weights
from agft_core.pretrain import pretrain_clip
from tasks.common import use_assigned_cpus

TEACHER_FILE = "clip.safetensors"


@ray.remote
def pretrain_teacher(arch: str, *, world_seed: int, out_dir: str, settings: dict) -> list[dict]:
    """settings: every pretrain config field (corpus_size, epochs and pretrain_clip's other arguments)."""
    use_assigned_cpus()
    settings = dict(settings)
    corpus_size, epochs = settings.pop("corpus_size"), settings.pop("epochs")
    corpus = world.generate("corpus", "pretrain", corpus_size, world_seed)
    model = pretrain_clip(
        arch,
        corpus.images,
        corpus.captions,
        epochs=epochs,
        **settings,
        on_epoch=lambda e, loss: print(f"pretrain epoch {e + 1}/{epochs}: loss {loss:.3f}", flush=True),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TEACHER_FILE
        save_weights(model, path, arch)
        upload(path, join(out_dir, TEACHER_FILE))
    return [describe_file(join(out_dir, TEACHER_FILE))]
