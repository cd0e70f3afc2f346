"""A trainer or a task the cluster can never hold is one clear line before any work, not a wait without end."""

import pytest

from pipeline.cluster import placement_problem, room_beside_training
from pipeline.config.loading import load_config

CPU2 = {"CPU": 2.0, "memory": 1e9}


def cfg_of(*overrides):
    return load_config(None, list(overrides))


def test_workers_that_fit_across_nodes_pass():
    # 2 workers of 1 CPU fit one 2-CPU node, or two nodes of 1 CPU each
    assert placement_problem(cfg_of(), [CPU2], None) == (None, False)
    assert placement_problem(cfg_of(), [{"CPU": 1.0}, {"CPU": 1.0}], None) == (None, False)


def test_a_worker_cannot_span_nodes():
    # 1.5 CPUs a worker: nodes of 2, 2 and 1 CPUs have 5 CPUs in all, more than 3 workers' 4.5,
    # yet hold only 2 workers (one on each 2-CPU node)
    message, fatal = placement_problem(
        cfg_of("train.cpus_per_worker=1.5", "train.num_workers=2"), [{"CPU": 2.0}, {"CPU": 2.0}], None
    )
    assert (message, fatal) == (None, False)
    message, fatal = placement_problem(
        cfg_of("train.cpus_per_worker=1.5", "train.num_workers=3"), [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 1.0}], None
    )
    assert fatal and "train.num_workers=3 workers of 1.5 CPU each; the cluster's nodes hold 2" in message


def test_gpu_workers_on_a_cluster_without_gpus_name_use_gpu():
    message, fatal = placement_problem(cfg_of("train.use_gpu=true"), [CPU2, CPU2], None)
    assert fatal and message == (
        "train.num_workers=2 workers of 1 CPU + 1 GPU each; the cluster's nodes hold 0: "
        "this cluster has no GPU: set train.use_gpu=false or add GPU nodes"
    )


def test_an_autoscaler_that_can_add_room_is_waited_for_and_one_that_cannot_is_an_error():
    gpu_node = {"CPU": 8.0, "GPU": 2.0}
    cfg = cfg_of("train.use_gpu=true", "train.num_workers=4")
    message, fatal = placement_problem(cfg, [CPU2], [(CPU2, 1), (gpu_node, 2)])
    assert not fatal and message.startswith("waiting for the autoscaler") and "hold 0" in message
    message, fatal = placement_problem(cfg, [CPU2], [(gpu_node, 1)])
    assert fatal and message.endswith("add at most 2: lower train.num_workers or train.cpus_per_worker, or add nodes")
    message, fatal = placement_problem(cfg, [CPU2], [(gpu_node, -1)])  # unbounded node type
    assert not fatal and message.startswith("waiting")


def test_gpu_tasks_on_a_cluster_without_gpus_name_task_gpus():
    message, fatal = placement_problem(cfg_of("resources.task_gpus=0.5"), [CPU2, CPU2], None)
    assert fatal and message == (
        "a DAG task (input check, caches, eval) of 1 CPU + 0.5 GPU each; the cluster's "
        "nodes hold 0: this cluster has no GPU: set resources.task_gpus=0 or add GPU nodes"
    )
    # half a GPU: a node with one holds two such tasks, and 0.1 GPU ten (not 9, as 1 / 0.1 truncated would)
    assert placement_problem(cfg_of("resources.task_gpus=0.5"), [{"CPU": 2.0, "GPU": 1.0}], None) == (None, False)
    assert placement_problem(
        cfg_of("train.use_gpu=true", "train.num_workers=10", "train.cpus_per_worker=0.1"),
        [{"CPU": 1.0, "GPU": 10.0}],
        None,
    ) == (None, False)


def test_a_task_bigger_than_every_node_is_an_error_and_an_autoscaler_node_type_is_waited_for():
    cfg = cfg_of("resources.task_cpus=3")
    message, fatal = placement_problem(cfg, [CPU2, CPU2], None)
    assert fatal and "a DAG task (input check, caches, eval) of 3 CPU each; the cluster's nodes hold 0" in message
    # both waiting: the trainer and the task each say what they wait for
    message, fatal = placement_problem(
        cfg_of("resources.task_cpus=3", "train.num_workers=3"), [CPU2], [(CPU2, 4), ({"CPU": 4.0}, 1)]
    )
    assert not fatal and message.startswith("waiting for the autoscaler to add nodes: train.num_workers=3 workers")
    assert "; a DAG task (input check, caches, eval) of 3 CPU each" in message


def test_eval_asks_for_no_trainer_and_a_sweep_trial_for_no_task():
    cfg = cfg_of("train.num_workers=8", "resources.task_cpus=4")
    assert placement_problem(cfg, [CPU2], None, tasks=False)[1]
    assert placement_problem(cfg, [CPU2], None, trainer=False)[1]
    assert placement_problem(cfg_of("train.num_workers=8"), [CPU2], None, trainer=False) == (None, False)
    assert placement_problem(cfg_of("resources.task_cpus=4"), [CPU2], None, tasks=False) == (None, False)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.num_workers=3", ["train.num_workers=3", "hold 2"]),
        # the input check is itself a 3-CPU task, which would wait for ever
        (
            "resources.task_cpus=3",
            ["a DAG task (input check, caches, eval) of 3 CPU each", "hold 0", "resources.task_cpus"],
        ),
    ],
)
def test_agft_run_the_cluster_cannot_hold_exits_2_before_any_work(
    ray_local, tmp_path, monkeypatch, capsys, override, expected
):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "run",
            "--set",
            override,
            "--set",
            f"cache_dir={tmp_path / 'cache'}",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and all(part in err[0] for part in expected), err
    assert not (tmp_path / "cache").exists()


def test_a_gpu_run_reduces_cpu_tensors_with_gloo_and_cuda_tensors_with_nccl():
    # under plain "nccl" the epoch's CPU float64 sums crashed every GPU run at the end of epoch 1
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from pipeline.trainer import GPU_BACKEND

    assert BackendConfig(Backend(GPU_BACKEND)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def test_the_originals_eval_runs_beside_training_only_where_a_node_has_room_left_for_it():
    """Counted per node, as Ray places requests: two nodes of 10 CPUs and 1.5 GPUs hold 20 CPUs and 3 GPUs, more
    than the trainer (2 x 8 CPUs, 1 GPU) and a task (4 CPUs, 0.5 GPU) ask in all, yet each keeps 2 CPUs."""
    cfg = cfg_of("train.use_gpu=true", "train.cpus_per_worker=8", "resources.task_cpus=4", "resources.task_gpus=0.5")
    assert not room_beside_training(cfg, [{"CPU": 10.0, "GPU": 1.5}] * 2)
    assert room_beside_training(cfg, [{"CPU": 12.0, "GPU": 1.5}] * 2)
    assert not room_beside_training(cfg, [{"CPU": 8.0, "GPU": 1.0}] * 2)  # the trainer takes both nodes
    assert room_beside_training(cfg, [{"CPU": 8.0, "GPU": 1.0}] * 3)


def test_a_sweep_runs_as_many_trials_at_once_as_the_cluster_holds_trainers():
    from pipeline.cluster import trainers_fitting

    train = cfg_of("train.use_gpu=true", "train.num_workers=2", "train.cpus_per_worker=8").train
    assert trainers_fitting(train, [{"CPU": 8.0, "GPU": 1.0}] * 5) == 2
    assert trainers_fitting(train, [{"CPU": 64.0, "GPU": 8.0}] * 2) == 8
    assert trainers_fitting(train, [{"CPU": 64.0, "GPU": 8.0}, {"CPU": 4.0}]) == 4  # CPU-only nodes hold none
    assert trainers_fitting(cfg_of().train, [CPU2]) == 1  # the demo on this machine: one at a time
