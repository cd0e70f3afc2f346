"""Stage calibrate (calibration.gamma: auto): γ fitted on the teacher cache by a Ray task, logged to a run with
the curve it minimised, and the config a fine-tune then trains with."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from agft_core.cache import CacheEntry
from agft_core.calibration import Calibration
from pipeline import report, tracking
from pipeline.config.schema import Config, with_overrides
from pipeline.config.sections import ConfigError
from pipeline.context import RunContext
from pipeline.remote import get
from tasks.calibrate import calibrate_gamma


def fit(ctx: RunContext, teacher_cache: CacheEntry, train_text: CacheEntry) -> Calibration:
    inv_tau = ctx.cfg.calibration.inv_tau
    task = calibrate_gamma.options(**ctx.cpu_options())
    fitted = get(task.remote(teacher_files=teacher_cache.files(), text_files=train_text.files(), inv_tau=inv_tau))
    clipped = (
        f" (the NLL still falls up to γ = {fitted.unclipped_gamma:.2f}; γ is at most 1)"
        if fitted.unclipped_gamma > 1
        else ""
    )
    ctx.log(
        f"[calibration] gamma auto: γ = {fitted.gamma:.3f}, the teacher's NLL minimised on a held-out fifth "
        f"of {ctx.cfg.data.train.name} at 1/τ = {inv_tau:g}{clipped}"
    )
    return fitted


def log(ctx: RunContext, run_id: str, calibration: Calibration | None) -> None:
    """The fitted γ as the run's metric calibration_gamma, with the curve it minimised."""
    if calibration is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fitted = asdict(calibration) | {"gamma": calibration.gamma}
        (out / "calibration.json").write_text(json.dumps(fitted, indent=1))
        report.plot_calibration(calibration, out / "calibration.png")
        tracking.log_results(
            ctx.tracking_uri,
            run_id,
            {"calibration_gamma": calibration.gamma},
            [out / "calibration.json", out / "calibration.png"],
        )


def resolved(cfg: Config, calibration: Calibration | None) -> Config:
    """cfg with calibration.gamma: auto replaced by the γ the teacher's fitted logit scale gives at cfg's own
    1/τ (which a sweep's trial may have changed)."""
    if cfg.calibration.gamma != "auto":
        return cfg
    if calibration is None:
        raise ConfigError("calibration.gamma: auto needs the fit on the teacher cache; this run has none")
    return with_overrides(cfg, {"calibration.gamma": calibration.gamma_for(cfg.calibration.inv_tau)})
