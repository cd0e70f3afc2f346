"""A Ray Train run's checkpoints on its storage: the newest complete one (which Ray Train may not know of), the
state to resume from, and the pruning of those a failed attempt left."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pyarrow.fs as pafs
import torch
from ray.train import Checkpoint

from agft_core.cache import basename, exists, filesystem, join
from tasks.common import say

ENCODER_FILE = "image_encoder.safetensors"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"  # the per-epoch metrics, each with its EPOCH_END
EPOCH_END = "epoch_end_time"  # a history field (unix seconds), not a metric


def resume_point(
    recorded: Checkpoint | None, newest_on_disk: str | None, device: torch.device
) -> tuple[Checkpoint | None, dict | None]:
    """The checkpoint to resume from and its state: Ray Train's, or a newer complete one on disk."""
    candidates = [recorded] if recorded else []
    if newest_on_disk and (not recorded or basename(newest_on_disk) > basename(recorded.path)):
        fs, path = filesystem(newest_on_disk)
        candidates.insert(0, Checkpoint(path, filesystem=fs))
    for checkpoint in candidates:
        try:
            with checkpoint.as_directory() as d:
                return checkpoint, torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            if checkpoint is recorded:
                raise  # Ray Train's own checkpoint must load
            say(f"[train] WARNING: {newest_on_disk} is incomplete; resuming from Ray Train's checkpoint", sys.stderr)
    return None, None


def _checkpoint_dirs(run_dir: str) -> list[str]:
    """The checkpoint directories of a Ray Train run, oldest first: Ray names them checkpoint_<time>."""
    fs, path = filesystem(run_dir)
    found = [
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    ]
    return [join(run_dir, name) for name in sorted(found)]


def newest_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint directory of a Ray Train run that holds all our files."""
    for directory in reversed(_checkpoint_dirs(run_dir)):
        if all(exists(join(directory, f)) for f in (STATE_FILE, ENCODER_FILE, HISTORY_FILE)):
            return directory
    return None


def prune(run_dir: str, keep: int) -> None:
    """Ray Train keeps its newest `keep` checkpoints, but not those uploaded by an attempt that failed
    before Ray recorded them (a worker killed during a report): after the run, only the newest stay."""
    for directory in _checkpoint_dirs(run_dir)[:-keep]:
        fs, path = filesystem(directory)
        fs.delete_dir(path)
