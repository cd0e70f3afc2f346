"""The human-facing report: result rows, tables, CSV and plots (matplotlib, drawn off-screen)."""

from __future__ import annotations

import csv
from contextlib import contextmanager
from pathlib import Path

from tabulate import tabulate


def accuracy_rows(results: list[dict], quick: list[dict] = ()) -> list[dict]:
    """One row per dataset plus the unweighted mean, as in the paper's table; results hold the headline
    attack's rows for the models "original" and "finetuned", quick another attack's (the "_quick" columns)."""
    by_dataset: dict[str, dict] = {}
    for r in results:
        row = by_dataset.setdefault(r["dataset"], {"dataset": r["dataset"]})
        row |= {f"{r['model']}_clean": r["clean"], f"{r['model']}_robust": r["robust"]}
    for r in quick:
        by_dataset[r["dataset"]][f"{r['model']}_quick"] = r["robust"]
    rows = list(by_dataset.values())
    columns = [c for c in rows[0] if c != "dataset"]
    rows.append({"dataset": "mean", **{c: mean([r[c] for r in rows]) for c in columns}})
    return rows


def mean(values: list) -> float | str:
    """The unweighted mean, or the text of a value that is not a number (a cell an eval shard left incomplete)."""
    text = [v for v in values if not isinstance(v, float)]
    return text[0] if text else sum(values) / len(values)


def as_percent(value) -> float:
    """A fraction as a percentage for a plot; NaN (nothing drawn) for a cell left incomplete."""
    return 100 * value if isinstance(value, float) else float("nan")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@contextmanager
def _figure(path: Path, figsize: tuple[float, float], rows: int = 1, columns: int = 1, dpi: int = 120):
    """The axes of a matplotlib figure drawn off-screen, laid out and saved to path when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(rows, columns, figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def plot_accuracy(rows: list[dict], path: Path, title: str) -> None:
    import numpy as np

    columns = [c for c in rows[0] if c != "dataset"]
    x = np.arange(len(rows))
    width = 0.8 / len(columns)
    with _figure(path, (max(6, 1.3 * len(rows)), 4)) as ax:
        for i, column in enumerate(columns):
            values = [as_percent(r[column]) for r in rows]
            hatch = "//" if column.endswith("robust") else None
            ax.bar(x + (i - (len(columns) - 1) / 2) * width, values, width, label=column.replace("_", " "), hatch=hatch)
        ax.set_xticks(x, [r["dataset"] for r in rows], rotation=20)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=2)


def plot_timeline(timeline: list[dict], path: Path, labelled: int = 60) -> None:
    """Each step (and each eval task) as a bar on the run's time axis: what ran, what was cached, what
    overlapped, and on which node. Past `labelled` bars (an evaluation in many shards) the bars go unlabelled
    and thin, so that the figure stays one page."""
    named = len(timeline) <= labelled
    with _figure(path, (9, min(0.35 * len(timeline), 18) + 1.2)) as ax:
        for i, bar in enumerate(timeline):
            ax.barh(
                i,
                max(bar["end"] - bar["start"], 0.05),
                left=bar["start"],
                height=0.8 if named else 1.0,
                color="lightgrey" if bar["cached"] else "tab:blue",
            )
            if named:
                where = "" if bar["node"] == "driver" else f"  node {bar['node'][:8]}"
                ax.text(bar["end"], i, f" {bar['end'] - bar['start']:.1f} s{where}", va="center", fontsize=7)
        if named:
            ax.set_yticks(range(len(timeline)), [bar["step"] for bar in timeline], fontsize=8)
        else:
            ax.set_ylabel(f"{len(timeline)} steps and tasks")
        ax.invert_yaxis()
        ax.set_xlabel("seconds since the run started (grey: every cache hit)")


def plot_calibration(calibration, path: Path) -> None:
    """calibration.gamma: auto - the teacher's NLL against γ on the held-out fifth it was fitted on and on
    the rest of the training split, with the chosen γ marked."""
    curve = calibration.curve
    with _figure(path, (6, 4)) as ax:
        ax.plot(curve["gamma"], curve["nll_fit"], label="held-out fifth (fitted on)")
        ax.plot(curve["gamma"], curve["nll_rest"], "--", label="the other four fifths")
        ax.axvline(calibration.gamma, color="k", lw=0.8)
        ax.annotate(
            f"γ = {calibration.gamma:.3f}",
            (calibration.gamma, calibration.nll),
            textcoords="offset points",
            xytext=(-60, 20),
            fontsize=8,
        )
        ax.set_xscale("log")
        ax.set_xlabel(f"γ (the teacher's logit scale is γ · {calibration.inv_tau:g})")
        ax.set_ylabel("teacher NLL of the true class")
        ax.set_title("calibration.gamma: auto")
        ax.legend(fontsize=8)


def dataset_metrics(rows: list[dict]) -> dict[str, float]:
    """{"<column>/<dataset>": value} for accuracy_rows' rows; a cell left incomplete is no metric."""
    return {
        f"{column}/{row['dataset']}": value
        for row in rows
        for column, value in row.items()
        if column != "dataset" and isinstance(value, float)
    }


def table(rows: list[dict], percent: bool = False, markdown: bool = True) -> str:
    """Rows as a markdown table, or without markdown a plain one for the console. Floats are fractions,
    shown to 4 places, or with percent as percentages to 2; every other cell as it is (tabulate's own
    number parsing would reformat cells that are already text, such as "81.00 ± 0.13")."""
    columns = list(rows[0]) if rows else []

    def cell(v):
        return (f"{100 * v:.2f}" if percent else f"{v:.4f}") if isinstance(v, float) else "" if v is None else str(v)

    return (
        tabulate(
            [[cell(r.get(c)) for c in columns] for r in rows],
            headers=columns,
            disable_numparse=True,
            tablefmt="github" if markdown else "simple",
            colalign=["left"] + ["right"] * (len(columns) - 1) if columns else None,
        )
        + "\n"
    )


def plot_sweep(trials: list[dict], axes: list[str], out: Path, best_trial: str | None = None) -> None:
    """frontier.png (validation clean vs robust, Pareto points joined, the chosen trial starred) and
    robust_vs_<field>.png."""
    done = [t for t in trials if t.get("val_robust_acc") is not None]
    with _figure(out / "frontier.png", (5.5, 4.5)) as ax:
        ax.scatter([100 * t["val_clean_acc"] for t in done], [100 * t["val_robust_acc"] for t in done])
        for t in done:
            point = (100 * t["val_clean_acc"], 100 * t["val_robust_acc"])
            ax.annotate(str(t["trial_id"])[-5:], point, fontsize=7)
            if t["trial_id"] == best_trial:
                ax.scatter(*point, marker="*", s=220, c="gold", edgecolors="black", label="chosen", zorder=3)
        frontier, best_robust = [], -1.0
        for t in sorted(done, key=lambda t: -t["val_clean_acc"]):
            if t["val_robust_acc"] > best_robust:
                frontier.append(t)
                best_robust = t["val_robust_acc"]
        ax.plot(
            [100 * t["val_clean_acc"] for t in frontier],
            [100 * t["val_robust_acc"] for t in frontier],
            "r--",
            label="Pareto frontier",
        )
        ax.set_xlabel("validation clean accuracy (%)")
        ax.set_ylabel("validation robust accuracy (%)")
        ax.legend()
    for axis in axes:
        points = [(t[axis], 100 * t["val_robust_acc"]) for t in done if isinstance(t.get(axis), (int, float))]
        if not points:
            continue
        with _figure(out / f"robust_vs_{axis}.png", (5, 3.8)) as ax:
            ax.scatter(*zip(*points))
            ax.set_xlabel(axis)
            ax.set_ylabel("validation robust accuracy (%)")
            if axis == "calibration.inv_tau" or "lr" in axis:
                ax.set_xscale("log")


def matrix_rows(results: list[dict]) -> list[dict]:
    """The evaluation matrix as a table: per model, a clean row and one row per (attack, ε), with one
    column per dataset and the unweighted mean over datasets."""
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    cells: dict[tuple, dict] = {}
    for r in results:
        cells.setdefault((r["model"], "clean", "", ""), {})[r["dataset"]] = r["clean"]
        cells.setdefault((r["model"], _attack_name(r), f"{r['eps'] * 255:g}", _alpha(r)), {})[r["dataset"]] = r[
            "robust"
        ]
    rows = []
    for (model, attack, eps255, alpha255), values in cells.items():
        rows.append(
            {
                "model": model,
                "attack": attack,
                "eps (/255)": eps255,
                "alpha (/255)": alpha255,
                **{d: values[d] for d in datasets},
                "mean": mean([values[d] for d in datasets]),
            }
        )
    return rows


def _attack_name(result: dict) -> str:
    """Rows hold attack_key's fields: None where the attack takes no such parameter."""
    if result["steps"] is None:
        return result["attack"]
    return f"{result['attack']}-{result['steps']}" + (f"x{result['restarts']}" if result["restarts"] > 1 else "")


def _alpha(result: dict) -> str:
    return "adaptive" if result["alpha"] is None else f"{result['alpha'] * 255:g}"


def matrix_metrics(results: list[dict]) -> dict[str, float]:
    """MLflow metrics named by model, dataset, attack and ε, e.g. robust/finetuned/colours/pgd-20/eps_1; a cell
    left incomplete is no metric."""
    metrics = {}
    for r in results:
        metrics[f"clean/{r['model']}/{r['dataset']}"] = r["clean"]
        metrics[f"robust/{r['model']}/{r['dataset']}/{_attack_name(r)}/eps_{r['eps'] * 255:g}"] = r["robust"]
    return {name: value for name, value in metrics.items() if isinstance(value, float)}


def plot_matrix(rows: list[dict], path: Path) -> None:
    """Mean zero-shot robust accuracy against ε, one line per (model, attack); clean as ε = 0."""
    clean = {r["model"]: r["mean"] for r in rows if r["attack"] == "clean"}
    lines: dict[tuple, list] = {}
    for r in rows:
        if r["attack"] != "clean":
            lines.setdefault((r["model"], r["attack"]), []).append((float(r["eps (/255)"]), r["mean"]))
    with _figure(path, (6, 4)) as ax:
        for (model, attack), points in lines.items():
            xs, ys = zip(*sorted([(0.0, clean[model])] + points))
            ax.plot(xs, [as_percent(y) for y in ys], marker="o", label=f"{model} / {attack}")
        ax.set_xlabel("ε (/255)")
        ax.set_ylabel("mean zero-shot accuracy (%)")
        ax.set_title("Zero-shot robustness (ε = 0: clean)")
        ax.legend(fontsize=8)


def plot_compare(mean_row: dict, path: Path, title: str) -> None:
    """Clean and robust bars per method, with the std over seeds as error bars (none for one seed)."""
    import numpy as np

    methods = list(dict.fromkeys(column.rsplit(" ", 1)[0] for column in mean_row if column != "dataset"))
    x = np.arange(len(methods))
    with _figure(path, (max(5, 1.4 * len(methods)), 4)) as ax:
        for offset, kind in ((-0.2, "clean"), (0.2, "robust")):
            means, stds = zip(*(mean_row[f"{m} {kind}"] for m in methods))
            ax.bar(
                x + offset, [100 * v for v in means], 0.4, yerr=[100 * (v or 0) for v in stds], capsize=3, label=kind
            )
        ax.set_xticks(x, methods)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.legend()


def plot_world(path: Path, world_seed: int, per_row: int = 8) -> None:
    """A grid of what the model sees: pretraining images with their captions, then each embedded
    task's test images with their labels."""
    import textwrap

    from agft_core import world

    corpus = world.generate("corpus", "pretrain", per_row, world_seed)
    rows = [("corpus", corpus.images, corpus.captions)]
    for name, task in world.TASKS.items():
        data = world.generate(name, "test", per_row, world_seed)
        rows.append((name, data.images, [task.template.format(task.classnames[y]) for y in data.labels]))
    with _figure(path, (1.9 * per_row, 2.3 * len(rows)), len(rows), per_row, dpi=110) as axes:
        for (name, images, labels), line in zip(rows, axes):
            for k, (ax, image, label) in enumerate(zip(line, images, labels)):
                ax.imshow(image, interpolation="nearest")
                ax.set_title("\n".join(textwrap.wrap(label, 22)), fontsize=6)
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_ylabel(name, fontsize=9)
