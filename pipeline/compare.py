"""`agft compare`: the original teacher against each method fine-tuned from it, over several seeds.

Every run shares the teacher (pretrained once, from pretrain.seed), the data, the budget and ε;
only the method and the fine-tune's seed change. The teacher and the text caches are built by the
first run and read by all others; the teacher cache by the first run of a method that reads it.
Results: one MLflow parent run with a nested run per (method, seed), and a table of mean ± sample std
over seeds, per dataset and over datasets.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import report, tracking
from pipeline.config.loading import dump_yaml
from pipeline.config.schema import Config, with_overrides
from pipeline.context import RunContext
from pipeline.run import run
from pipeline.stages.evaluate import IncompleteEvaluation

ORIGINAL = "original"


@dataclass
class CompareResult:
    parent_run_id: str
    table: list[dict]  # one row per dataset (and the mean): "<method> clean" / "<method> robust" -> (mean, std)
    per_seed: list[dict]  # method, seed, dataset, clean, robust
    seconds: float


def compare(cfg: Config, uri: str, out: Path, log=print) -> CompareResult:
    start = time.perf_counter()
    spec = cfg.compare
    parent = tracking.start_run(
        uri, cfg.experiment, cfg.run_params(), {"mlflow.runName": "compare", "kind": "compare"}, cfg.artifact_location
    )
    per_seed = []
    with tracking.finishing(uri, parent):
        total = len(spec.seeds) * len(spec.methods)
        for i, seed in enumerate(spec.seeds):
            for j, method in enumerate(spec.methods):
                log(f"[compare] run {i * len(spec.methods) + j + 1}/{total}: {method}, seed {seed}")
                # The table shows the headline attack only: the quick view would cost time for nothing
                run_cfg = with_overrides(
                    cfg, {"seed": seed, "train.method": method, "eval.quick": None, **spec.per_method.get(method, {})}
                )
                # No seed changes the teacher's weights, only its attack's random start: it is evaluated
                # once, in the first run, instead of spending a run's eval on it per seed
                first = i == 0 and j == 0
                result = run(RunContext(run_cfg, uri, log=log), parent_run_id=parent, original=first)
                if result.failures:  # a mean over seeds needs every cell
                    raise IncompleteEvaluation(
                        f"{method}, seed {seed}: {len(result.failures)} eval shard(s) failed (above); the same "
                        f"command again computes only the missing shards"
                    )
                if first:  # every run reads the same data
                    tracking.log_datasets(uri, parent, result.datasets)
                for row in result.rows:
                    if row["dataset"] == "mean":
                        continue
                    if first:
                        per_seed.append(
                            {
                                "method": ORIGINAL,
                                "seed": seed,
                                "dataset": row["dataset"],
                                "clean": row["original_clean"],
                                "robust": row["original_robust"],
                            }
                        )
                    per_seed.append(
                        {
                            "method": method,
                            "seed": seed,
                            "dataset": row["dataset"],
                            "clean": row["finetuned_clean"],
                            "robust": row["finetuned_robust"],
                        }
                    )
        table = summary_table(per_seed, cfg.data.train.name)
        _report(uri, parent, cfg, table, per_seed, out)
    return CompareResult(parent, table, per_seed, round(time.perf_counter() - start, 1))


def summary_table(per_seed: list[dict], fine_tuned: str | None = None) -> list[dict]:
    """Mean and sample std over each method's seeds (None for one seed, as the original teacher has),
    per dataset and for two averages that first average over datasets within a seed: "mean" over every
    dataset (the paper's, which counts ImageNet val), and, last, "zero-shot mean" over the datasets other
    than the `fine_tuned` one."""
    methods = list(dict.fromkeys(r["method"] for r in per_seed))
    datasets = list(dict.fromkeys(r["dataset"] for r in per_seed))
    seeds = {m: list(dict.fromkeys(r["seed"] for r in per_seed if r["method"] == m)) for m in methods}
    value = {(r["method"], r["seed"], r["dataset"], k): r[k] for r in per_seed for k in ("clean", "robust")}
    averages = {"mean": datasets, "zero-shot mean": [d for d in datasets if d != fine_tuned]}

    def stats(samples: list[float]) -> tuple[float, float | None]:
        return statistics.fmean(samples), statistics.stdev(samples) if len(samples) > 1 else None

    rows = []
    for name in datasets + list(averages):
        row = {"dataset": name}
        for method in methods:
            for kind in ("clean", "robust"):
                over = averages.get(name, [name])
                row[f"{method} {kind}"] = stats(
                    [statistics.fmean(value[method, s, d, kind] for d in over) for s in seeds[method]]
                )
        rows.append(row)
    return rows


def markdown(table: list[dict], seeds: int, caption: str) -> str:
    """caption: what the robust columns are (attack and count) and how each method was trained."""
    cells = [
        {
            "dataset": row["dataset"],
            **{
                column: f"{100 * m:.2f}" + ("" if s is None else f" ± {100 * s:.2f}")
                for column, (m, s) in list(row.items())[1:]
            },
        }
        for row in table
    ]
    return (
        f"Zero-shot top-1 accuracy (%), mean ± sample std over {seeds} seed(s) of each fine-tune; the original "
        f"teacher (no seed changes its weights) evaluated once, at the first seed's attack start\n{caption}\n\n"
        + report.table(cells)
    )


def _report(uri: str, parent: str, cfg: Config, table: list[dict], per_seed: list[dict], out: Path) -> None:
    tuned = "".join(
        f"; {method}: " + ", ".join(f"{k} = {v}" for k, v in values.items())
        for method, values in cfg.compare.per_method.items()
    )
    attack = cfg.eval.model_copy(update={"quick": None}).caption()  # its runs leave the quick view out
    text = markdown(table, len(cfg.compare.seeds), f"{attack}\n{cfg.train.recipe_caption()}{tuned}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    metrics = {
        f"{column.replace(' ', '_')}/{row['dataset'].replace(' ', '_')}": mean
        for row in table
        for column, (mean, _) in list(row.items())[1:]
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(dump_yaml(cfg))
        report.write_csv(per_seed, folder / "compare_per_seed.csv")
        report.plot_compare(
            table[-1],
            folder / "compare.png",
            f"Zero-shot mean over datasets not fine-tuned on, ± std over {len(cfg.compare.seeds)} seed(s)",
        )
        tracking.log_results(
            uri, parent, metrics, [out, folder / "config.yaml", folder / "compare_per_seed.csv", folder / "compare.png"]
        )
