"""Issue 30's declared benchmark: can the embedded world tell AGFT from FARE? Every method fine-tunes on `scenes`
(256 classes, so that a soft target over the training classes spans the embedding as ImageNet's do), is tuned on the
same grid, and is reported on the zero-shot tasks whose label does not depend on the training label.

Declared before any result (issue 30), and not to be changed after seeing numbers:
- training task `scenes`; zero-shot tasks: `shapes` and the world's suite. The headline mean is over the tasks
  whose label is independent of a scene's colour, shape and background (INDEPENDENT); the same-scene mean (tasks on
  the training images' scenes) and the other-domain mean (glyphs) are reported apart;
- one grid for every method: train.lr in LRS x train.attack.eps in {2, 4}/255, AGFT on top with gamma in {0.4, 1} at
  1/tau = 1.8 x the teacher's own logit scale (the paper's ratios); selected on val_robust_acc of `positions`' train
  split (512 images), never a reported test set; a pick on an lr edge widens the lr grid once, and the edges are
  reported;
- PMG-AFT as its authors' code computes it (pmg_aft), and agft's earlier form (pmg_aft_scaled). Issue 30 described
  the authors' first release (KL(adv || other)); their final PMG_AFT.py (2024-05-29) computes KL(other || adv), and
  pmg_aft follows it since 2026-12-07 (docs/changes.md). Changed after the first sweeps' pmg_aft rows, not after
  seeing any result of the final form;
- 2 teacher seeds x 3 fine-tune seeds; mean and standard error over the 6 runs.

Usage: .venv/bin/python bench/methods_apart.py --store DIR [--set FIELD=VALUE ...]
                                              [--out bench/results/methods_apart.json]
DIR keeps the caches and the MLflow store. Each finished step (a method's sweep, one fine-tune of the comparison) is
written to the JSON at once; the same command again goes on from the first unfinished step. --set applies to every
step (e.g. fewer epochs for a quick look; the JSON records them).
"""

import argparse
import csv
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
from agft_cli import agft, output, sets

from agft_core.model import create_clip, logit_scale
from pipeline.cli import local_ray_options
from pipeline.config.loading import load_config
from pipeline.context import RunContext
from pipeline.stages.pretrain import teacher_weights

METHODS = ("agft", "tecoa", "pmg_aft", "pmg_aft_scaled", "fare", "tga_zsr")
LRS = [1.0e-4, 3.0e-4, 1.0e-3]
EPS = ["2/255", "4/255"]
GAMMAS = [0.4, 1.0]
METRIC = "val_robust_acc"  # the selection score, sweep.metric in BASE
INV_TAU_PER_SCALE = 1.8  # the paper's 1/tau = 180 over CLIP's logit scale of 100
TEACHER_SEEDS, SEEDS = [0, 1], [0, 1, 2]
SAME_SCENE = ("shapes", "colours", "backgrounds", "positions")
OTHER_DOMAIN = ("digits", "letters", "handwritten")
INDEPENDENT = ("positions", *OTHER_DOMAIN)  # a scenes label fixes colour, shape and background, not these
BASE = [
    "pretrain.amp=bf16",  # the sweeps' teacher, pretrained when bf16 was the default; auto is fp32 on some CPUs
    "data.train.name=scenes",
    "data.zero_shot=" + json.dumps([{"name": name} for name in SAME_SCENE + OTHER_DOMAIN]),
    "train.validation.dataset={name: positions, split: train, limit: 512}",
    f"sweep.metric={METRIC}",
    "sweep.scheduler=fifo",
    "sweep.num_samples=1",
    "register_models=false",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", help="caches and MLflow store, kept between runs of this script")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="FIELD=VALUE")
    parser.add_argument("--out", default="bench/results/methods_apart.json")
    parser.add_argument("--tables", action="store_true", help="print the tables of the JSON so far; run nothing")
    args = parser.parse_args()
    if args.tables:
        report = json.loads(Path(args.out).read_text())
        print(sweeps_markdown(report.get("sweeps", {})))
        if "summary" in report:
            print("\n" + markdown(report["summary"]))
        return
    if not args.store:
        parser.error("--store is required unless --tables")
    out, store = output(args.out), Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    report = json.loads(out.read_text()) if out.exists() else {}
    if report and report["overrides"] != args.overrides:
        raise SystemExit(f"{out} holds a run with --set {report['overrides']}: use another --out")
    report = report or {"machine": platform.platform(), "cpus": os.cpu_count(), "overrides": args.overrides}
    report.setdefault("declared", {"lrs": LRS, "eps": EPS, "gammas": GAMMAS, "independent": INDEPENDENT})
    common = ["--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", *sets(f"cache_dir={store / 'cache'}")]
    overrides = BASE + args.overrides

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    scales, checked = report.setdefault("teacher_scales", {}), set()

    def scale(teacher: int) -> float:
        """The logit scale of the store's teacher `teacher`, recorded in the JSON, or checked against the JSON's:
        the sweeps picked on that teacher. Looked at once per run of this script, and only when a step still needs
        the teacher: a lost store pretrains it anew, which can take hours."""
        if teacher not in checked:
            found = teacher_scale(overrides, store, teacher)
            recorded = scales.setdefault(str(teacher), found)
            if not math.isclose(recorded, found, rel_tol=1e-6):
                raise SystemExit(f"teacher {teacher}: logit scale {found} here, {recorded} in the JSON: not the same")
            checked.add(teacher)
            save()
        return scales[str(teacher)]

    # -- each method's sweep, on the first teacher
    sweeps = report.setdefault("sweeps", {})
    for method in METHODS:
        if method not in sweeps:
            sweeps[method] = tune(method, common, overrides, scale(TEACHER_SEEDS[0]), store)
            save()

    # -- every method at its pick, over each teacher's fine-tune seeds: seed by seed, each run kept as it ends
    compares = report.setdefault("compares", {})
    for teacher in TEACHER_SEEDS:
        ran = compares.get(str(teacher), {}).get("runs", [])
        missing = [(s, m) for s in SEEDS for m in METHODS if not any(r["method"] == m and r["seed"] == s for r in ran)]
        if not missing:
            continue
        per_method = {m: picked(sweeps[m]["chosen"], m, scale(teacher)) for m in METHODS}
        ran = compares.setdefault(str(teacher), {"per_method": per_method, "runs": []})["runs"]
        for seed, method in missing:
            ran.append(compare_run(teacher, method, seed, per_method[method], common, overrides, store))
            save()
    report["summary"] = summary([row for ran in compares.values() for run in ran["runs"] for row in run["rows"]])
    save()
    print(markdown(report["summary"]))


def teacher_scale(overrides: list[str], store: Path, teacher: int) -> float:
    """The logit scale the teacher of pretrain.seed `teacher` learned, pretrained into the store's cache if missing."""
    cfg = load_config(None, overrides + [f"cache_dir={store / 'cache'}", f"pretrain.seed={teacher}"])
    ray.init(logging_level="WARNING", **local_ray_options())
    try:
        weights = teacher_weights(RunContext(cfg, f"sqlite:///{store / 'mlflow.db'}"))
    finally:
        ray.shutdown()
    return logit_scale(create_clip(cfg.model.arch, weights))


def space(method: str, lrs: list[float], scale: float) -> dict:
    axes = {"train.lr": {"grid": lrs}, "train.attack.eps": {"grid": EPS}}
    if method == "agft":
        axes |= {"calibration.gamma": {"grid": GAMMAS}, "calibration.inv_tau": {"grid": [INV_TAU_PER_SCALE * scale]}}
    return axes


def tune(method: str, common: list[str], overrides: list[str], scale: float, store: Path) -> dict:
    """The method's sweep over the declared grid, widened once if its lr pick is on an edge. The widening sweeps only
    the new lr: the pick is the best last-epoch validation score over both rounds' trials (a trial is deterministic,
    so the points of the first round would only repeat)."""
    lrs, new_lrs, rounds, trials = list(LRS), list(LRS), [], []
    while True:
        axes = space(method, new_lrs, scale)
        argv = [*overrides, f"train.method={method}", f"sweep.space={json.dumps(axes)}"]
        with tempfile.TemporaryDirectory() as tmp:  # the pick is made below, over both rounds
            seconds = agft("sweep", *common, *sets(*argv), "--best-out", f"{tmp}/best.yaml")
        found = sweep_trials(store, argv, list(axes))
        rounds.append({"space": axes, "seconds": seconds, "trials": found})
        trials += found
        best = max(trials, key=lambda t: t[METRIC])
        chosen = {key: best[key] for key in axes}
        edge = chosen["train.lr"] in (min(lrs), max(lrs))
        print(f"[methods apart] {method}: {chosen} ({'on an lr edge' if edge else 'inside'} {lrs})", flush=True)
        if not edge or len(rounds) == 2:
            return {"rounds": rounds, "chosen": chosen, "lr_edge": edge, "lrs": lrs}
        new_lrs = [min(lrs) / 3] if chosen["train.lr"] == min(lrs) else [max(lrs) * 3]
        lrs = sorted(lrs + new_lrs)


def sweep_trials(store: Path, argv: list[str], keys: list[str]) -> list[dict]:
    """Each trial of the sweep that `agft sweep --set ARGV` ran in the store (its parent run is named after the
    sweep): its values of `keys` and its last epoch's validation scores."""
    from mlflow.tracking import MlflowClient

    from pipeline.sweep import sweep_name

    cfg = load_config(None, [f"cache_dir={store / 'cache'}", *argv])
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.experiment).experiment_id
    parent = client.search_runs(
        [experiment], f"tags.`mlflow.runName` = '{sweep_name(cfg)}' and tags.sweep = 'parent'", max_results=1
    )[0]  # newest first
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return [
        {key: float(child.data.params[key]) for key in keys}
        | {name: child.data.metrics[name] for name in ("val_clean_acc", METRIC)}
        for child in sorted(children, key=lambda c: c.data.tags["trial_id"])
        if child.info.status == "FINISHED"
    ]


def picked(chosen: dict, method: str, scale: float) -> dict:
    """A method's picked values for one teacher: AGFT's 1/tau follows that teacher's own logit scale."""
    return chosen | ({"calibration.inv_tau": INV_TAU_PER_SCALE * scale} if method == "agft" else {})


def compare_run(
    teacher: int, method: str, seed: int, values: dict, common: list[str], overrides: list[str], store: Path
) -> dict:
    """`agft compare` of one method at its pick and one fine-tune seed, on the teacher of pretrain.seed `teacher`:
    one run at a time, so that a run that ended is kept in the JSON when the store is lost. Its rows: the fine-tune's
    clean and robust accuracy on each task, and at seed SEEDS[0] the original teacher's (as one compare of every seed
    evaluates it, once, at its first seed)."""
    from mlflow.tracking import MlflowClient

    experiment = f"methods-apart-teacher{teacher}"
    started = time.time()
    seconds = agft(
        "compare",
        *common,
        *sets(
            *overrides,
            f"experiment={experiment}",
            f"pretrain.seed={teacher}",
            f"compare.methods={json.dumps([method])}",
            f"compare.seeds={json.dumps([seed])}",
            f"compare.per_method={json.dumps({method: values})}",
        ),
        "--out",
        str(store / f"compare-teacher{teacher}-{method}-seed{seed}.md"),
    )
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        f"tags.kind = 'compare' and attributes.start_time >= {int(started * 1000)}",
    )
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(parent.info.run_id, "compare_per_seed.csv", tmp)) as f:
            rows = [
                {**r, "teacher": teacher, "seed": seed, "clean": float(r["clean"]), "robust": float(r["robust"])}
                for r in csv.DictReader(f)
                if r["method"] == method or seed == SEEDS[0]
            ]
    return {"method": method, "seed": seed, "rows": rows, "seconds": seconds, "run": parent.info.run_id}


def summary(per_seed: list[dict]) -> list[dict]:
    """Per method: the headline (independent), same-scene and other-domain means of clean and robust accuracy, each
    first averaged over its tasks within a (teacher, seed) run, then mean and standard error over the runs."""
    groups = {"independent": INDEPENDENT, "same-scene": SAME_SCENE, "other-domain": OTHER_DOMAIN}
    rows = []
    for method in dict.fromkeys(r["method"] for r in per_seed):
        runs = {(r["teacher"], r["seed"]) for r in per_seed if r["method"] == method}
        row = {"method": method, "runs": len(runs)}
        for group, tasks in groups.items():
            for kind in ("clean", "robust"):
                means = [
                    statistics.fmean(
                        r[kind]
                        for r in per_seed
                        if r["method"] == method and (r["teacher"], r["seed"]) == run and r["dataset"] in tasks
                    )
                    for run in sorted(runs)
                ]
                error = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else None
                row[f"{group} {kind}"] = [statistics.fmean(means), error]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c not in ("method", "runs")]
    lines = ["| method | runs | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for row in rows:
        cells = [f"{100 * m:.2f}" + ("" if e is None else f" ± {100 * e:.2f}") for m, e in (row[c] for c in columns)]
        lines.append(f"| {row['method']} | {row['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweeps_markdown(sweeps: dict) -> str:
    """Every trial of each method's sweep: validation robust % (clean %) at each lr, a row per training ε (and γ for
    AGFT); the pick in bold."""
    lrs = sorted({t["train.lr"] for s in sweeps.values() for r in s["rounds"] for t in r["trials"]})
    lines = ["| method | ε | γ | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 3) + "|"]
    for method, tuned in sweeps.items():
        trials = {}
        for trial in (t for r in tuned["rounds"] for t in r["trials"]):
            setting = (trial["train.attack.eps"], trial.get("calibration.gamma"))
            trials.setdefault(setting, {})[trial["train.lr"]] = trial
        for (eps, gamma), by_lr in sorted(trials.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            cells = []
            for lr in lrs:
                trial = by_lr.get(lr)
                cell = f"{100 * trial[METRIC]:.1f} ({100 * trial['val_clean_acc']:.1f})" if trial else ""
                is_pick = trial and all(trial[k] == v for k, v in tuned["chosen"].items())
                cells.append(f"**{cell}**" if is_pick else cell)
            head = f"| {method} | {round(eps * 255)}/255 | {'' if gamma is None else f'{gamma:g}'} | "
            lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
