import importlib.util
import re
from pathlib import Path

import pytest

from agft_core.pretrain import resolve_amp
from pipeline.cli import main
from pipeline.config.loading import load_config
from pipeline.config.sections import ConfigError
from pipeline.stages.pretrain import cache_key as pretrain_key

REPO = Path(__file__).resolve().parent.parent


def test_paper_config_validates_with_the_paper_setting():
    cfg = load_config(REPO / "configs" / "vitb32_imagenet.yaml")
    assert (cfg.model.arch, cfg.model.weights) == ("ViT-B-32", "openai")
    assert (cfg.calibration.gamma, cfg.calibration.inv_tau) == (0.4, 180)
    assert cfg.train.attack.eps == pytest.approx(1 / 255) and cfg.train.attack.alpha == pytest.approx(1 / 255)
    assert (cfg.train.attack.steps, cfg.train.lr, cfg.train.epochs) == (2, 4e-4, 10)


def test_the_lr_and_the_warm_up_follow_the_global_batch_by_the_stated_rule():
    """The paper: lr 4e-4 for 2 GPUs x 128 images, 1000 warm-up iterations (0.2 of ImageNet's 5004 steps an
    epoch at that batch). At 16 workers (the shipped config's auto on deploy/'s 2 x 8 GPUs) the global batch is 8
    times larger."""
    import torch

    from pipeline.train import make_optimizer

    paper = load_config(REPO / "configs" / "vitb32_imagenet.yaml", ["train.num_workers=2"])
    assert (paper.train.global_batch, paper.train.effective_lr) == (256, 4e-4)
    assert paper.train.warmup_steps(1_281_167 // 256) == 1001
    wide = {
        rule: load_config(
            REPO / "configs" / "vitb32_imagenet.yaml", ["train.num_workers=16", f"train.lr_scaling={rule}"]
        ).train
        for rule in ("none", "linear", "sqrt")
    }
    assert wide["linear"].global_batch == 2048 and wide["linear"].warmup_steps(1_281_167 // 2048) == 125
    assert wide["none"].effective_lr == 4e-4
    assert wide["linear"].effective_lr == pytest.approx(3.2e-3)
    assert wide["sqrt"].effective_lr == pytest.approx(4e-4 * 8**0.5)
    optimizer = make_optimizer(wide["linear"], [torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["lr"] == pytest.approx(3.2e-3)  # what trains is the scaled lr
    params = load_config(REPO / "configs" / "vitb32_imagenet.yaml", ["train.num_workers=16"]).run_params()
    assert (params["train"]["global_batch"], params["train"]["effective_lr"]) == (2048, pytest.approx(3.2e-3))


def test_the_shipped_sweeps_try_each_value_once_and_select_on_a_split_no_reported_number_uses():
    from pipeline.config.checks import check_sweep

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        check_sweep(cfg)  # a space, and a validation split for its val_ metric
        reported = {(d.kind, d.name, d.split, d.root) for d in cfg.data.zero_shot}
        held_out = cfg.train.validation.dataset
        assert (held_out.kind, held_out.name, held_out.split, held_out.root) not in reported, path
        assert cfg.sweep.search == "random" and cfg.sweep.max_concurrent_trials == "auto", path


def test_paper_config_evaluates_with_the_papers_protocol():
    cfg = load_config(REPO / "configs" / "vitb32_imagenet.yaml")
    assert cfg.eval.attack.as_tuple() == ("pgd", pytest.approx(1 / 255), pytest.approx(1 / 255), 20, 1)
    assert cfg.eval.robust == "attacked" and cfg.eval.matrix.alpha == pytest.approx(1 / 255)
    assert cfg.eval.caption().startswith(
        "robust: PGD-20 (α = 1/255), ε = 1/255; an image counts as robust when "
        "its attacked version is classified correctly (the paper's count)"
    )
    assert load_config(None, ["eval.matrix.eps=[4/255]"]).eval.matrix.alpha == pytest.approx(1 / 255)  # not α = ε


@pytest.mark.parametrize(
    "method, optimizer, lr, weight_decay, eps255, steps",
    [
        ("agft", "sgd", 4e-4, 0.0, 1, 2),
        ("tecoa", "sgd", 1e-5, 0.0, 1, 2),
        ("pmg_aft", "sgd", 5e-5, 0.0, 1, 2),
        ("fare", "adamw", 1e-5, 1e-4, 4, 10),
        ("tga_zsr", "sgd", 1e-4, 0.0, 1, 2),
    ],
)
def test_published_recipe_replaces_the_shared_one_per_method(method, optimizer, lr, weight_decay, eps255, steps):
    from pipeline.config.schema import with_overrides

    shared = load_config(None, [f"train.method={method}"])  # demo.yaml: lr 5e-4 and ε = 2/255 for every method
    assert (shared.train.optimizer, shared.train.lr, round(255 * shared.train.attack.eps)) == ("sgd", 5e-4, 2)
    published = with_overrides(load_config(None, ["train.recipe=published"]), {"train.method": method})
    train = published.train
    assert (train.optimizer, train.lr, train.weight_decay, train.attack.steps) == (optimizer, lr, weight_decay, steps)
    assert train.attack.eps == pytest.approx(eps255 / 255) and train.attack.alpha == pytest.approx(1 / 255)
    assert (train.epochs, train.batch_size) == (shared.train.epochs, shared.train.batch_size)  # the same budget
    assert "published recipe" in train.recipe_caption() and "lr 0.0005" in shared.train.recipe_caption()


def test_each_methods_loss_weights_and_model_check_come_from_its_row():
    """train.<method>.alpha/beta exist exactly for the rows with loss weights, at their defaults; a method that
    needs a ViT is refused on a ResNet and the message offers the others."""
    from agft_core.catalog import METHOD_SPECS
    from pipeline.config.schema import TrainConfig

    weighted = {name for name, spec in METHOD_SPECS.items() if spec.loss_weights}
    assert weighted == {"pmg_aft", "pmg_aft_scaled", "tga_zsr"} and weighted <= set(TrainConfig.model_fields)
    train = load_config(None).train
    assert {name: (getattr(train, name).alpha, getattr(train, name).beta) for name in weighted} == {
        "pmg_aft": (1.0, 1.0),
        "pmg_aft_scaled": (1.0, 1.0),
        "tga_zsr": (0.08, 0.05),
    }
    assert not set(METHOD_SPECS) - weighted & set(TrainConfig.model_fields)
    with pytest.raises(ConfigError, match=r"tga_zsr needs a ViT .* \(use agft, tecoa, pmg_aft, pmg_aft_scaled, fare\)"):
        load_config(None, ["model.arch=RN50", "model.weights=random", "train.method=tga_zsr"])


def test_the_recipes_optimizer_is_the_one_that_trains():
    import torch

    from pipeline.config.schema import with_overrides
    from pipeline.train import make_optimizer

    fare = with_overrides(load_config(None, ["train.recipe=published"]), {"train.method": "fare"}).train
    optimizer = make_optimizer(fare, [torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 1e-4
    assert type(make_optimizer(load_config(None).train, [torch.nn.Parameter(torch.zeros(2))])) is torch.optim.SGD


def test_per_method_compare_settings_are_checked_like_the_config():
    assert load_config(
        None, ["compare.methods=[fare]", "compare.per_method={fare: {train.attack.eps: 4/255}}"]
    ).compare.per_method == {"fare": {"train.attack.eps": "4/255"}}
    with pytest.raises(ConfigError, match=r"compare\.per_method\.tecoa: train\.lrr: Extra inputs"):
        load_config(None, ["compare.per_method={tecoa: {train.lrr: 1.0e-4}}"])
    with pytest.raises(ConfigError, match=r"compare\.per_method\.fare: fare is not in compare\.methods"):
        load_config(None, ["compare.per_method={fare: {train.attack.eps: 4/255}}"])
    with pytest.raises(ConfigError, match=r"compare\.per_method\.fare: train\.attack\.eps: .*less than or equal"):
        load_config(None, ["compare.methods=[fare]", "compare.per_method={fare: {train.attack.eps: 2}}"])
    with pytest.raises(ConfigError, match=r"compare\.per_method\.tecoa\.train\.lr: train\.recipe published sets"):
        load_config(None, ["train.recipe=published", "compare.per_method={tecoa: {train.lr: 1.0e-4}}"])


def test_a_published_recipe_cannot_be_swept():
    with pytest.raises(ConfigError, match=r"sweep\.space\.train\.lr: train\.recipe published sets it"):
        load_config(None, ["train.recipe=published", "sweep.space={train.lr: {choice: [1.0e-5, 1.0e-4]}}"])


def test_set_overrides_one_field_and_parses_fractions():
    cfg = load_config(None, ["train.epochs=7", "eval.attack.eps=4/255"])
    assert cfg.train.epochs == 7
    assert cfg.eval.attack.eps == pytest.approx(4 / 255)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.nonsense=1", "train.nonsense"),
        ("train.attack.eps=1.5", "train.attack.eps"),
        ("train.attack.eps=-0.1", "train.attack.eps"),
        ("calibration.gamma=0", "calibration.gamma"),
        ("calibration.gamma=1.2", "calibration.gamma: 1.2 is not in (0, 1]; use a number in (0, 1] or auto"),
        (
            "calibration.gamma=automatic",
            "calibration.gamma: 'automatic' is not a number; use a number in (0, 1] or auto",
        ),
        ("calibration.inv_tau=0", "calibration.inv_tau"),
        ("model.arch=ViT-Q-99", "model.arch"),
        ("eval.quick.restarts=2", "eval.quick: restarts: only apgd-ce restarts, not pgd"),
        ("eval.precision=fp8", "eval.precision"),
        ("data.decode=dali", "data.decode"),
        ("train.grad_compression=fp16", "train.grad_compression"),
        ("resources.loader_workers=many", "resources.loader_workers"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(None, [override])


def test_transformers_is_not_installed_and_an_arch_that_needs_it_is_one_clear_error():
    """open_clip imports transformers whenever it is installed, 1.3 CPU-s in every process that builds a model:
    it is no dependency (pyproject's [tool.agft]). An architecture whose text tower or tokenizer is Hugging Face's
    then asks for it in the config's error."""
    assert importlib.util.find_spec("transformers") is None
    needs = r"model\.arch: .*roberta-ViT-B-32's text tower or tokenizer .* pip install transformers"
    with pytest.raises(ConfigError, match=needs):
        load_config(None, ["model.arch=roberta-ViT-B-32", "model.weights=random"])
    with pytest.raises(ConfigError, match="ViT-B-16-SigLIP"):  # open_clip's own towers, Hugging Face's tokenizer
        load_config(None, ["model.arch=ViT-B-16-SigLIP", "model.weights=random"])
    assert load_config(None, ["model.arch=ViT-B-32", "model.weights=random"]).model.arch == "ViT-B-32"


@pytest.mark.parametrize(
    ("setting", "cpus", "processes"), [("auto", 10, 9), ("auto", 1, 0), ("auto", 0.5, 0), (3, 10, 3)]
)
def test_loader_workers_auto_decodes_on_every_cpu_beside_the_computing_one(setting, cpus, processes):
    resources = load_config(None, [f"resources.loader_workers={setting}"]).resources
    assert resources.loader_processes(cpus) == processes


def test_unknown_config_file_is_one_line(capsys):
    assert main(["validate", "--config", "/nowhere/cfg.yaml"]) == 2
    assert "/nowhere/cfg.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "job"])
def test_a_relative_sqlite_store_is_refused_on_a_cluster(tmp_path, monkeypatch, capsys, how):
    """Under `ray job submit` (RAY_ADDRESS set by Ray) or with --address, sqlite:///mlflow.db would be a
    file in the job's package directory on the head, deleted with it; refused before Ray starts."""
    from pipeline.cli import main
    from pipeline.config.checks import tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["run", "--set", f"cache_dir={tmp_path / 'c'}"]
    if how == "flag":
        args += ["--address", "10.0.0.1:6379"]
    else:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agft: error: --tracking-uri: sqlite:///mlflow.db")
    assert list(tmp_path.iterdir()) == []
    assert tracking_uri("sqlite:////shared/mlflow.db", cluster=True) == "sqlite:////shared/mlflow.db"
    assert tracking_uri("http://mlflow:5000", cluster=True) == "http://mlflow:5000"
    assert tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_config_is_checked_without_importing_torch_ray_or_mlflow(tmp_path):
    """What makes a config error answer at once: the CLI validates before the heavy imports."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    probe = (
        "import sys; from pipeline.cli import main; code = main(['validate', '--config', sys.argv[1]]); "
        "heavy = sorted({'torch', 'ray', 'mlflow', 'open_clip', 'pyarrow'} & set(sys.modules)); "
        "print(code, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "2 []" and "duplicate key 'epochs'" in out.stderr


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"agft {version('agft')}"


def test_amp_off_written_bare_in_yaml_is_the_string_off(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  amp: off\n")  # YAML 1.1 reads it as false
    cfg = load_config(config, ["pretrain.amp=off"])
    assert (cfg.train.amp, cfg.pretrain.amp) == ("off", "off")


def test_the_teacher_cache_key_is_every_pretrain_field_and_nothing_the_fine_tune_sets():
    cfg = load_config(None, [])
    amp = "off" if resolve_amp(cfg.pretrain.amp) == "bf16" else "bf16"  # the other precision than the default's
    other = {"corpus_size": 7, "epochs": 3, "batch_size": 5, "lr": 0.1, "seed": 9, "amp": amp}
    for field in type(cfg.pretrain).model_fields:  # a new field without a value here fails: key it, then list it
        changed = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={field: other[field]})})
        assert pretrain_key(changed) != pretrain_key(cfg), field
    assert pretrain_key(load_config(None, ["seed=5", "train.lr=0.1", "train.amp=off"])) == pretrain_key(cfg)


def test_pretrain_amp_auto_is_keyed_as_the_precision_it_resolves_to(monkeypatch):
    """auto pretrains in bf16 on a CPU with native bf16 and in fp32 elsewhere, and the teacher's key says which: on a
    native-bf16 CPU, auto finds the bf16 teacher cached before auto existed."""
    from agft_core import pretrain

    keys = {amp: pretrain_key(load_config(None, [f"pretrain.amp={amp}"])) for amp in ("off", "bf16")}
    assert keys["off"] != keys["bf16"]
    for native, precision in ((True, "bf16"), (False, "off")):
        monkeypatch.setattr(pretrain, "native_bf16", lambda native=native: native)
        assert pretrain_key(load_config(None, ["pretrain.amp=auto"])) == keys[precision]


def test_a_task_asks_for_one_gpu_at_most():
    """A task computes on the first GPU Ray gives it: a second would sit idle, so the config refuses it (on any
    machine: the CLI's bad-input case is refused on this GPU-less one anyway, for asking for GPUs at all)."""
    assert load_config(None, ["resources.task_gpus=1"]).resources.task_gpus == 1
    with pytest.raises(ConfigError, match="resources.task_gpus"):
        load_config(None, ["resources.task_gpus=2"])


@pytest.mark.parametrize(
    "override, field",
    [("compare.seeds=[0, 1, 1]", "compare.seeds"), ("compare.methods=[agft, tecoa, agft]", "compare.methods")],
)
def test_a_comparison_names_each_seed_and_method_once(override, field):
    """A repeated seed trained again from the cache, and its mean ± std counted it once while the caption counted it
    twice ("over 3 seeds" for 2)."""
    with pytest.raises(ConfigError, match=rf"{field}: each at most once; repeated: (1|agft)$"):
        load_config(None, [override])
