"""The `agft` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

from agft_core.errors import InputError, first_line
from pipeline.config.checks import check_ray_address, check_sweep, check_tracking, on_cluster, tracking_uri
from pipeline.config.loading import dump_yaml, load_config
from pipeline.config.sections import ConfigError

STEPS = ("pretrain", "text", "teacher", "train", "eval")


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config and --set, as load_config(args.config, args.overrides) takes them (also the benchmarks')."""
    p.add_argument("--config", help="YAML config (default: configs/demo.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one config field, e.g. --set train.epochs=2 (repeatable)",
    )
    return p


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agft", description="Alignment-Guided Fine-Tuning on Ray.")
    parser.add_argument("--version", action="version", version=f"agft {version('agft')}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_cluster(p):
        with_config(p)
        p.add_argument("--address", help="attach to a running Ray cluster (default: start a local one)")
        p.add_argument(
            "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
        )
        p.add_argument(
            "--verbose",
            action="store_true",
            help="also Ray's, Ray Train's and Tune's INFO logs (same as --set verbose=true)",
        )
        return p

    run = with_cluster(commands.add_parser("run", help="run the whole DAG: caches, fine-tune, eval, report"))
    run.add_argument(
        "--rerun",
        action="append",
        default=[],
        choices=STEPS,
        help="recompute this step even if its cache is valid (repeatable)",
    )
    run.add_argument("--summary", metavar="PATH", help="also write the results, step times and cache hits as JSON")
    sweep = with_cluster(commands.add_parser("sweep", help="Ray Tune search over the config's sweep.space"))
    sweep.add_argument("--best-out", default="best.yaml", help="where to write the best trial's config")
    evaluate = with_cluster(
        commands.add_parser(
            "eval", help="the evaluation matrix (eval.matrix): datasets x attacks x eps, original and checkpoints"
        )
    )
    evaluate.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also evaluate this fine-tuned image encoder, e.g. agft=image_encoder.safetensors "
        "(repeatable; same as --set eval.matrix.checkpoints.NAME=PATH)",
    )
    comparison = with_cluster(
        commands.add_parser("compare", help="the original teacher vs each of compare.methods, over compare.seeds")
    )
    comparison.add_argument("--out", default="compare.md", help="where to write the markdown table")
    show = with_config(
        commands.add_parser("world", help="draw the embedded world's images with their captions and labels into a PNG")
    )
    show.add_argument("--out", default="world.png")
    with_config(commands.add_parser("validate", help="check a config and print it fully resolved"))
    planning = with_config(
        commands.add_parser("plan", help="predict each stage's work, GPU-hours and wall time before a run")
    )
    planning.add_argument("--gpus", type=int, help="GPUs to plan for (default: train.num_workers)")
    planning.add_argument("--gpu-tflops", type=float, default=989.0, help="peak per GPU (an H100 SXM's dense bf16)")
    planning.add_argument("--mfu", type=float, default=0.35, help="share of the peak the model reaches")
    planning.add_argument("--cpus-per-gpu", type=float, default=12.0, help="CPUs decoding images, per GPU")
    planning.add_argument(
        "--decode-rate",
        type=float,
        default=100.0,
        help="images a CPU decodes and resizes per s (102 measured: bench/decode_throughput.py)",
    )
    return parser


# Ray Train's own PreemptionWatcher actor, and Ray Data's actor pools (data.decode: ray_data), log the first at
# ERROR level (ray-project/ray#53727): it concerns an actor restart that Ray manages, nothing a user can act on. The
# raylet prints the second when a train worker dies, which Ray Train recovers from and
# pipeline.train_controller.FailureLine reports in one line. The rest are the five INFO lines Ray Data prints for
# each dataset it runs (also in its ray-data.log): the run's own lines say what each stage did and how long it took.
RAY_NOISE = (
    r"Actor with class name: '(PreemptionWatcher|MapWorker\(.*\))' .* has constructor arguments in the object store"
    r"|A worker died or was killed while executing a task by an unexpected system error"
    r"|Progress bars disabled\. To enable|Starting execution of Dataset |Execution plan of Dataset "
    r"|Dataset \S+ execution finished in |Data sink \w+ finished\. "
)


def _skip_ray_noise() -> None:
    """Ray's driver drops worker log lines that match RAY_DEDUP_LOGS_SKIP_REGEX, read once as Ray is
    imported: set before that, and kept alongside a pattern the user set."""
    import os

    current = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX", "")
    if RAY_NOISE not in current:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{current}|{RAY_NOISE}" if current else RAY_NOISE


def local_ray_options() -> dict:
    """ray.init's options for a Ray started by this process: its dashboard on a port of its own, named to its
    workers. Ray Train's placement-group cleaner asks the state API whether the trainer's controller lives, and
    the state API guesses "the" local Ray (the last `ray start`, or any GCS process here): beside a second Ray on
    the machine it asks the wrong one, and leaks or removes the trainer's placement group.

    Without Ray Train's preemption watcher: an actor per fine-tune that waits for an autoscaler to drain a node,
    and this Ray has neither an autoscaler nor a node that outlives this process (2-3 CPU-s a fine-tune here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_vars = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    return {"dashboard_port": port, "runtime_env": {"env_vars": env_vars}}


def _start_ray(address: str | None, verbose: bool) -> None:
    import logging
    import os

    import ray

    starts_here = address is None and not os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address,
        logging_level=logging.INFO if verbose else logging.WARNING,
        ignore_reinit_error=True,
        log_to_driver=True,
        configure_logging=True,
        **(local_ray_options() if starts_here else {}),
    )
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)  # "Creating tables..."
    if not verbose:  # a model logged and registered draws a download bar for each file it checks
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        checkpoints = [f"eval.matrix.checkpoints.{c}" for c in getattr(args, "checkpoint", [])]
        verbose = ["verbose=true"] if getattr(args, "verbose", False) else []
        cfg = load_config(args.config, args.overrides + checkpoints + verbose)
        if args.command == "validate":
            print(dump_yaml(cfg), end="")
            return 0
        if args.command == "plan":
            return _plan(cfg, args)
        if args.command == "world":
            from pipeline.report import plot_world

            plot_world(Path(args.out), cfg.data.world_seed)
            print(f"wrote {args.out}")
            return 0
        if args.command == "sweep":
            check_sweep(cfg)
        uri = tracking_uri(args.tracking_uri, on_cluster(args.address))
        check_tracking(uri)
        check_ray_address(args.address)
    except ConfigError as exc:
        print(f"agft: error: {exc}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    if not cfg.verbose:
        _skip_ray_noise()
    # Heavy imports once the input is known to be good, and before Ray starts: torch reads the working
    # directory as it loads, which under `ray job submit` is a package directory that Ray manages.
    from ray.exceptions import RayTaskError

    from pipeline.context import RunContext
    from pipeline.report import table
    from pipeline.run import check_inputs, run, run_eval
    from pipeline.stages.evaluate import IncompleteEvaluation
    from pipeline.tracking import TRACKING_ERRORS

    _start_ray(args.address, cfg.verbose)

    try:
        from pipeline.cluster import check_cuda, check_resources, resolve_workers

        cfg = resolve_workers(cfg)
        # first: the input check is itself a task
        trains = args.command in ("run", "sweep", "compare")
        check_resources(cfg, trainer=trains, tasks=True)
        check_cuda(cfg, trainer=trains)
        check_inputs(cfg)
        if args.command == "sweep":
            return _sweep(cfg, uri, Path(args.best_out))
        if args.command == "compare":
            return _compare(cfg, uri, Path(args.out))
        if args.command == "eval":
            return _eval(run_eval(RunContext(cfg, uri)), cfg, uri)
        result = run(RunContext(cfg, uri, frozenset(args.rerun)))
    except InputError as exc:  # bad data or weights, found by the tasks that read them, before training
        print(f"agft: error: {exc}", file=sys.stderr)
        return 2
    except IncompleteEvaluation as exc:
        print(f"agft: error: {exc}", file=sys.stderr)
        return 1
    except RayTaskError as exc:  # a task failed for a reason that is not the input's: a bug or the machine
        if cfg.verbose:
            raise
        cause = str(exc.cause).strip().splitlines()[-1] if str(exc.cause).strip() else type(exc.cause).__name__
        task = getattr(exc, "function_name", None) or "(unnamed)"  # unset when the task failed to import
        print(
            f"agft: error: task {task} failed: {type(exc.cause).__name__}: {cause} (--verbose shows the traceback)",
            file=sys.stderr,
        )
        return 1
    except TRACKING_ERRORS as exc:  # MLflow already retried with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES)
        print(
            f"agft: error: the tracking server {uri} failed ({first_line(exc)[:300]}); caches and checkpoints are "
            f"kept: run the same command again once it answers, and the run's record is completed",
            file=sys.stderr,
        )
        return 1

    print()
    print(f"Zero-shot top-1 accuracy (%): original teacher vs {cfg.train.method.upper()} fine-tuned")
    print(cfg.eval.caption())
    print(table([{c.replace("_", " "): v for c, v in r.items()} for r in result.rows], percent=True, markdown=False))
    total = round(time.perf_counter() - start, 2)
    print(f"step seconds: {result.seconds}   total: {total}s")
    if args.summary:
        Path(args.summary).write_text(json.dumps({**asdict(result), "total_seconds": total}, indent=2))
    return _browse("run", result.run_id, uri, result.failures)


def _plan(cfg, args) -> int:
    from pipeline.plan import Assumptions, forward_flops, table
    from pipeline.report import table as markdown

    gpus = args.gpus or cfg.train.num_workers
    if gpus == "auto":
        raise ConfigError("train.num_workers is auto: give --gpus, e.g. --gpus 16 for 2 nodes of 8")
    given = Assumptions(gpus, args.gpu_tflops, args.mfu, args.cpus_per_gpu, args.decode_rate)
    flops = forward_flops(cfg)
    print(
        f"agft run of {cfg.model.arch} ({flops / 1e9:.2f} GFLOP per image forward), {cfg.train.method}, "
        f"{cfg.train.epochs} epochs, on {gpus} GPUs at {given.peak_tflops:g} TFLOP/s and {given.mfu:.0%} MFU, "
        f"{given.cpus_per_gpu:g} CPUs per GPU decoding {given.decode_rate:g} images/s each"
    )
    rows = table(cfg, flops, given)
    print(markdown([{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]), end="")
    print("FLOPs bound the GPU time; every image decoded from disk once per epoch, attack and model bounds the CPUs.")
    return 0


def _browse(label: str, run_id: str, uri: str, failures: list[str] = ()) -> int:
    """The run's address, and exit code 1 when some of its evaluation failed (the cells it shows as incomplete)."""
    from pipeline.tracking import browse_hint

    run, runs = browse_hint(uri, run_id)
    print(f"MLflow {label}: {run_id}")
    print(f"Browse it:  {run}")
    print(f"All runs:   {runs}")
    if failures:
        print(
            f"agft: error: {len(failures)} eval shard(s) failed (above) and their cells read incomplete; the same "
            f"command again computes only the missing shards",
            file=sys.stderr,
        )
        return 1
    return 0


def _compare(cfg, uri: str, out: Path) -> int:
    from pipeline.compare import compare

    result = compare(cfg, uri, out)
    print()
    print(out.read_text(), end="")
    print(f"wall time: {result.seconds}s   table: {out}")
    return _browse("parent run", result.parent_run_id, uri)


def _eval(result, cfg, uri: str) -> int:
    from pipeline.config.sections import ROBUST_MEANING
    from pipeline.report import table

    print()
    print("Zero-shot top-1 accuracy (%): clean, and robust under each attack and eps")
    print(ROBUST_MEANING[cfg.eval.robust])
    print(table(result.rows, percent=True), end="")
    print(f"step seconds: {result.seconds}")
    return _browse("run", result.run_id, uri, result.failures)


def _sweep(cfg, uri: str, best_out: Path) -> int:
    from pipeline.report import table
    from pipeline.sweep import SweepFailed, sweep

    try:
        result = sweep(cfg, uri, best_out)
    except SweepFailed as exc:
        print(f"agft: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(table(result.trials), end="")
    print(f"seconds: {result.seconds}")
    print(f"best: {result.best_params}  ->  {result.best_config_path}")
    print(f"reproduce it: agft run --config {result.best_config_path}")
    return _browse("parent run", result.parent_run_id, uri)


if __name__ == "__main__":
    sys.exit(main())
