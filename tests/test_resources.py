"""A trainer the cluster can never hold is one clear line before any work, not a wait without end."""
from pipeline.config import load_config
from pipeline.train import placement_problem

CPU2 = {"CPU": 2.0, "memory": 1e9}


def train_cfg(*overrides):
    return load_config(None, list(overrides)).train


def test_workers_that_fit_across_nodes_pass():
    # 2 workers of 1 CPU fit one 2-CPU node, or two nodes of 1 CPU each
    assert placement_problem(train_cfg(), [CPU2], None) == (None, False)
    assert placement_problem(train_cfg(), [{"CPU": 1.0}, {"CPU": 1.0}], None) == (None, False)


def test_a_worker_cannot_span_nodes():
    # 1.5 CPUs a worker: nodes of 2, 2 and 1 CPUs have 5 CPUs in all, more than 3 workers' 4.5,
    # yet hold only 2 workers (one on each 2-CPU node)
    message, fatal = placement_problem(train_cfg("train.cpus_per_worker=1.5", "train.num_workers=2"),
                                       [{"CPU": 2.0}, {"CPU": 2.0}], None)
    assert (message, fatal) == (None, False)
    message, fatal = placement_problem(train_cfg("train.cpus_per_worker=1.5", "train.num_workers=3"),
                                       [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 1.0}], None)
    assert fatal and "train.num_workers=3 workers of 1.5 CPU each; the cluster's nodes hold 2" in message


def test_gpu_workers_on_a_cluster_without_gpus_name_use_gpu():
    message, fatal = placement_problem(train_cfg("train.use_gpu=true"), [CPU2, CPU2], None)
    assert fatal and "1 CPU + 1 GPU" in message and "train.use_gpu" in message and "hold 0" in message


def test_an_autoscaler_that_can_add_room_is_waited_for_and_one_that_cannot_is_an_error():
    gpu_node = {"CPU": 8.0, "GPU": 2.0}
    cfg = train_cfg("train.use_gpu=true", "train.num_workers=4")
    message, fatal = placement_problem(cfg, [CPU2], [(CPU2, 1), (gpu_node, 2)])
    assert not fatal and message.startswith("waiting for the autoscaler") and "hold 0" in message
    message, fatal = placement_problem(cfg, [CPU2], [(gpu_node, 1)])
    assert fatal and "add at most 2" in message
    message, fatal = placement_problem(cfg, [CPU2], [(gpu_node, -1)])  # unbounded node type
    assert not fatal and message.startswith("waiting")


def test_agft_run_with_more_workers_than_the_cluster_exits_2_before_any_work(ray_local, tmp_path, monkeypatch,
                                                                            capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", "--set", "train.num_workers=3", "--set", f"cache_dir={tmp_path / 'cache'}",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.num_workers=3" in err[0] and "hold 2" in err[0]
    assert not (tmp_path / "cache").exists()
