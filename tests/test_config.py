from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_paper_config_validates_with_the_paper_setting():
    cfg = load_config(REPO / "configs" / "vitb32_imagenet.yaml")
    assert (cfg.model.arch, cfg.model.weights) == ("ViT-B-32", "openai")
    assert (cfg.calibration.gamma, cfg.calibration.inv_tau) == (0.4, 180)
    assert cfg.train.attack.eps == pytest.approx(1 / 255) and cfg.train.attack.alpha == pytest.approx(1 / 255)
    assert (cfg.train.attack.steps, cfg.train.lr, cfg.train.epochs) == (2, 4e-4, 10)


def test_set_overrides_one_field_and_parses_fractions():
    cfg = load_config(None, ["train.epochs=7", "eval.attack.eps=4/255"])
    assert cfg.train.epochs == 7
    assert cfg.eval.attack.eps == pytest.approx(4 / 255)


@pytest.mark.parametrize("override, field", [
    ("train.nonsense=1", "train.nonsense"),
    ("train.attack.eps=1.5", "train.attack.eps"),
    ("train.attack.eps=-0.1", "train.attack.eps"),
    ("calibration.gamma=0", "calibration.gamma"),
    ("calibration.gamma=1.2", "calibration.gamma"),
    ("calibration.inv_tau=0", "calibration.inv_tau"),
    ("model.arch=ViT-Q-99", "model.arch"),
])
def test_bad_values_are_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_config_file_is_one_line(capsys):
    assert main(["validate", "--config", "/nowhere/cfg.yaml"]) == 2
    assert "/nowhere/cfg.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "job"])
def test_a_relative_sqlite_store_is_refused_on_a_cluster(tmp_path, monkeypatch, capsys, how):
    """Under `ray job submit` (RAY_ADDRESS set by Ray) or with --address, sqlite:///mlflow.db would be a
    file in the job's package directory on the head, deleted with it; refused before Ray starts."""
    from pipeline.cli import main
    from pipeline.config import tracking_uri

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
    probe = ("import sys; from pipeline.cli import main; code = main(['validate', '--config', sys.argv[1]]); "
             "heavy = sorted({'torch', 'ray', 'mlflow', 'open_clip', 'pyarrow'} & set(sys.modules)); "
             "print(code, heavy)")
    out = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "2 []" and "duplicate key 'epochs'" in out.stderr


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"agft {version('agft')}"
