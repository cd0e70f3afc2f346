"""A tiny `agft compare`: nested runs per (method, seed), the table, and its statistics."""
import statistics

from mlflow.tracking import MlflowClient

from pipeline.cli import main

TINY = ["pretrain.corpus_size=256", "pretrain.epochs=1", "pretrain.batch_size=64", "data.train.limit=128",
        "data.zero_shot=[{name: shapes, limit: 48}, {name: colours, limit: 48}, {name: sizes, limit: 48}]",
        "train.epochs=1", "train.batch_size=32", "train.validation=null", "eval.attack.steps=2",
        "compare.methods=[tecoa, agft]", "compare.seeds=[0, 1]"]


def test_compare_writes_nested_runs_and_a_mean_std_table(ray_local, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "compare.md"
    argv = ["compare", "--tracking-uri", uri, "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(argv + [a for o in TINY for a in ("--set", o)]) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("agft").experiment_id
    (parent,) = client.search_runs([experiment], "tags.kind = 'compare'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["agft-seed0", "agft-seed1", "tecoa-seed0", "tecoa-seed1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"compare.md", "compare.png",
                                                                         "compare_per_seed.csv"}
    # every cell of every run: robust never above clean
    for child in children:
        m = child.data.metrics
        for dataset in ("shapes", "colours", "sizes"):
            assert m[f"finetuned_robust/{dataset}"] <= m[f"finetuned_clean/{dataset}"]
    # the parent's numbers are the mean over the children's
    for method in ("tecoa", "agft"):
        runs = [c for c in children if c.info.run_name.startswith(method)]
        expected = statistics.fmean(c.data.metrics["finetuned_robust/mean"] for c in runs)
        assert abs(parent.data.metrics[f"{method}_robust/mean"] - expected) < 1e-12
        assert parent.data.metrics[f"{method}_robust/mean"] <= parent.data.metrics[f"{method}_clean/mean"]
        # the zero-shot mean leaves out the fine-tuned task (shapes)
        held_out = statistics.fmean(c.data.metrics[f"finetuned_robust/{d}"] for c in runs for d in ("colours", "sizes"))
        assert abs(parent.data.metrics[f"{method}_robust/zero-shot_mean"] - held_out) < 1e-12
    table = out.read_text()
    assert "mean ± sample std over 2 seed(s)" in table and "| original clean | original robust |" in table
    sizes_row = next(line for line in table.splitlines() if line.startswith("| sizes |"))
    agft_seed_values = [100 * c.data.metrics["finetuned_clean/sizes"] for c in children
                        if c.info.run_name.startswith("agft")]
    assert f"{statistics.fmean(agft_seed_values):.2f} ± {statistics.stdev(agft_seed_values):.2f}" in sizes_row
    assert "[compare] run 4/4: agft, seed 1" in capsys.readouterr().out
