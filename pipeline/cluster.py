"""The cluster's shape against what a command asks Ray for: how many trainers fit, whether an eval task fits
beside one, what can never be placed (checked before any work), and whether the GPUs asked for have CUDA."""

from __future__ import annotations

from typing import NamedTuple

import ray

from pipeline.config.schema import Config, TrainConfig, with_overrides
from pipeline.config.sections import ConfigError
from tasks.describe import cuda_available
from tasks.streaming import Streaming


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}


def task_resources(cfg: Config) -> dict[str, float]:
    """What one DAG task that computes on images (caches, eval) asks Ray for."""
    return {"CPU": cfg.resources.task_cpus, "GPU": cfg.resources.task_gpus}


def alive_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def _fits(shape: dict[str, float], node: dict[str, float]) -> int:
    """How many requests of this shape one node's total resources hold (Ray counts in steps of 1e-4)."""
    return int(min(node.get(key, 0) / amount for key, amount in shape.items() if amount) + 1e-6)


def trainers_fitting(cfg: TrainConfig, nodes: list[dict[str, float]]) -> int:
    """How many trainers (train.num_workers workers each) the nodes' total resources hold at once; at least 1."""
    return max(1, sum(_fits(worker_resources(cfg), node) for node in nodes) // cfg.num_workers)


def room_beside_training(cfg: Config, nodes: list[dict[str, float]]) -> bool:
    """Whether a DAG task still fits on some node once the trainer's workers are placed, each request on one
    node as Ray places them: the workers first, each on the node with the least room that holds it."""
    free = [dict(node) for node in nodes]
    worker, task = worker_resources(cfg.train), task_resources(cfg)
    for _ in range(cfg.train.num_workers):
        fitting = [node for node in free if _fits(worker, node)]
        if not fitting:
            return False
        node = min(fitting, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        for key, amount in worker.items():
            node[key] -= amount
    return any(_fits(task, node) for node in free)


def streaming_plan(cfg: Config, nodes: list[dict[str, float]], batch_size: int) -> Streaming:
    """How a Ray Data stream spreads over the nodes: decode actors on any node's CPUs, as many as they hold (Ray
    Data grows the pool while CPUs are free), and for the teacher cache one model actor per task slot holding a
    GPU; without task_gpus the decoders embed what they decode."""
    task = task_resources(cfg)
    embedders = sum(_fits(task, node) for node in nodes) if cfg.resources.task_gpus else 1
    return Streaming(
        decoders=max(1, int(sum(node.get("CPU", 0) for node in nodes) // cfg.resources.decode_cpus)),
        decode_cpus=cfg.resources.decode_cpus,
        embedders=max(1, embedders),
        task_cpus=cfg.resources.task_cpus,
        task_gpus=cfg.resources.task_gpus,
        batch_size=batch_size,
        fused=not cfg.resources.task_gpus,
    )


def _cluster_shape() -> tuple[list[dict[str, float]], list[tuple[dict[str, float], int]] | None]:
    """Each alive node's total resources, and the autoscaler's (resources, max nodes; -1 unbounded) per node
    type, or None without an autoscaler."""
    # The autoscaler publishes its node types in the GCS; ray.autoscaler has no public reader yet.
    from ray._private.state import state

    config = state.get_cluster_config()
    groups = [(dict(g.resources), g.max_count) for g in config.node_group_configs] if config else None
    return alive_nodes(), groups


def trainer_room(cfg: Config) -> int:
    """trainers_fitting on the cluster's alive nodes, or on its worker groups at their autoscaler's maximum
    (bounded ones) if that holds more."""
    alive, groups = _cluster_shape()
    scaled = [resources for resources, max_count in groups or [] for _ in range(max(0, max_count))]
    return max(trainers_fitting(cfg.train, alive), trainers_fitting(cfg.train, scaled))


def gpu_workers(cfg: TrainConfig, nodes: list[dict[str, float]], groups: list[tuple[dict, int]] | None) -> int:
    """What train.num_workers: auto means: as many train workers as the alive nodes hold, or the autoscaler's
    node groups at their maximum (bounded ones) if those hold more; at least 1."""
    one = worker_resources(cfg)
    scaled = [resources for resources, max_count in groups or [] for _ in range(max(0, max_count))]
    return max(1, sum(_fits(one, node) for node in nodes), sum(_fits(one, node) for node in scaled))


def resolve_workers(cfg: Config) -> Config:
    """cfg with train.num_workers: auto replaced by gpu_workers on this cluster, said in one line."""
    if cfg.train.num_workers != "auto":
        return cfg
    workers = gpu_workers(cfg.train, *_cluster_shape())
    print(f"[cluster] train.num_workers: auto -> {workers} (one per GPU the cluster holds or can scale to)")
    return with_overrides(cfg, {"train.num_workers": workers})


class Demand(NamedTuple):
    """`count` requests of `shape` that must be placed together, and the settings that size them."""

    label: str
    shape: dict[str, float]
    count: int
    to_lower: str
    gpu_setting: str


def demands(cfg: Config, trainer: bool, tasks: bool) -> list[Demand]:
    """The trainer's workers, placed at once, and the largest single DAG task (the input check, caches, eval)."""
    workers = Demand(
        f"train.num_workers={cfg.train.num_workers} workers",
        worker_resources(cfg.train),
        cfg.train.num_workers,
        "train.num_workers or train.cpus_per_worker",
        "train.use_gpu=false",
    )
    task = Demand(
        "a DAG task (input check, caches, eval)",
        task_resources(cfg),
        1,
        "resources.task_cpus or resources.task_gpus",
        "resources.task_gpus=0",
    )
    return [workers] * trainer + [task] * tasks


def placement_problem(
    cfg: Config,
    nodes: list[dict[str, float]],
    node_groups: list[tuple[dict[str, float], int]] | None,
    *,
    trainer: bool = True,
    tasks: bool = True,
) -> tuple[str | None, bool]:
    """(message, fatal) when the cluster cannot hold the trainer's workers (`trainer`) or a DAG task (`tasks`)
    now, else (None, False).

    nodes: each alive node's total resources. node_groups: the autoscaler's (resources, max nodes; -1
    unbounded) per node type, or None without an autoscaler. Fatal: no autoscaler could ever add room.
    """
    waiting = []
    for demand in demands(cfg, trainer, tasks):
        now = sum(_fits(demand.shape, node) for node in nodes)
        if now >= demand.count:
            continue
        shape = " + ".join(f"{amount:g} {key}" for key, amount in demand.shape.items() if amount)
        need = f"{demand.label} of {shape} each; the cluster's nodes hold {now}"
        anywhere = nodes + [resources for resources, _ in node_groups or []]
        no_gpus = demand.shape.get("GPU") and not any(node.get("GPU") for node in anywhere)
        fix = (
            f"this cluster has no GPU: set {demand.gpu_setting} or add GPU nodes"
            if no_gpus
            else f"lower {demand.to_lower}, or add nodes"
        )
        if node_groups is not None:
            room = [
                max_count if max_count < 0 else max_count * _fits(demand.shape, resources)
                for resources, max_count in node_groups
                if _fits(demand.shape, resources) > 0
            ]
            if any(r < 0 for r in room) or now + sum(room) >= demand.count:
                waiting.append(need)
                continue
            return f"{need}, and the autoscaler's node types add at most {sum(room)}: {fix}", True
        return f"{need}: {fix}", True
    return ("waiting for the autoscaler to add nodes: " + "; ".join(waiting) if waiting else None), False


def check_resources(cfg: Config, *, trainer: bool, tasks: bool) -> None:
    """Before any work: a trainer or a task that could never be placed would wait forever."""
    problem, fatal = placement_problem(cfg, *_cluster_shape(), trainer=trainer, tasks=tasks)
    if fatal:
        raise ConfigError(problem)
    if problem:
        print(f"[cluster] {problem}", flush=True)


# nccl for CUDA tensors and gloo for any CPU tensor: a collective on a CPU tensor under plain nccl crashes the run
GPU_BACKEND = "cpu:gloo,cuda:nccl"


CUDA_PROBE_TIMEOUT_S = 120
PROBE_GPUS = 1e-4  # Ray's smallest unit: the probe fits beside whatever already holds the node's GPUs


def check_cuda(cfg: Config, *, trainer: bool) -> None:
    """Before any work: GPUs asked for (train.use_gpu by a command that trains, resources.task_gpus) on a node
    that declares GPUs to Ray but has no CUDA would compute for hours on its CPUs. Refused, unless
    resources.cpu_fallback allows it. Each GPU node alive now is asked, where its GPUs are."""
    if cfg.resources.cpu_fallback or not ((trainer and cfg.train.use_gpu) or cfg.resources.task_gpus):
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    probes = {
        cuda_available.options(
            num_cpus=0,
            num_gpus=PROBE_GPUS,
            scheduling_strategy=(NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)),
        ).remote(): n
        for n in nodes
    }
    ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=CUDA_PROBE_TIMEOUT_S)
    without = [probes[ref] for ref in ready if not ray.get(ref)]
    if without:
        node = without[0]
        asked = [
            field
            for field, on in (
                ("train.use_gpu", trainer and cfg.train.use_gpu),
                (f"resources.task_gpus={cfg.resources.task_gpus:g}", cfg.resources.task_gpus),
            )
            if on
        ]
        raise ConfigError(
            f"resources.cpu_fallback: {' and '.join(asked)} ask{'s' * (len(asked) == 1)} for GPUs, and node "
            f"{node['NodeManagerAddress']} declares {node['Resources']['GPU']:g} to Ray but has no CUDA"
            f"{f' (and {len(without) - 1} more nodes)' if len(without) > 1 else ''}: its GPU work would "
            f"run on its CPUs; fix its CUDA, set train.use_gpu=false and resources.task_gpus=0, or "
            f"set resources.cpu_fallback=true to compute on the CPUs anyway"
        )
