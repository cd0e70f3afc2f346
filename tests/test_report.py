"""The report's renderers on small made-up results: every plot writes a PNG that opens, and the one table
renderer formats numbers but leaves text cells alone."""

import torch
from PIL import Image

from agft_core.calibration import fit_gamma
from pipeline import report

ROWS = [
    {
        "dataset": "shapes",
        "original_clean": 0.6,
        "original_robust": 0.04,
        "finetuned_clean": 0.59,
        "finetuned_robust": 0.1,
    },
    {
        "dataset": "mean",
        "original_clean": 0.8,
        "original_robust": 0.25,
        "finetuned_clean": 0.77,
        "finetuned_robust": 0.3,
    },
]


def _opens(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_every_plot_writes_a_png(tmp_path):
    report.plot_accuracy(ROWS, tmp_path / "accuracy.png", "title")
    report.plot_timeline(
        [
            {"step": "train", "start": 0.0, "end": 2.0, "cached": False, "node": "driver"},
            {"step": "eval x", "start": 1.0, "end": 3.0, "cached": True, "node": "abcdef0123"},
        ],
        tmp_path / "timeline.png",
    )
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(200, 8, generator=g), dim=-1)
    labels = (images @ text.T).argmax(-1)
    fitted = fit_gamma(images, labels, torch.arange(200), text, 30.0)
    report.plot_calibration(fitted, tmp_path / "calibration.png")
    trials = [
        {
            "trial_id": f"t_0000{i}",
            "calibration.gamma": 0.2 * (i + 1),
            "val_clean_acc": 0.9 - 0.1 * i,
            "val_robust_acc": 0.5 + 0.05 * i,
        }
        for i in range(3)
    ]
    report.plot_sweep(trials, ["calibration.gamma"], tmp_path)
    report.plot_matrix(
        [
            {"model": "original", "attack": "clean", "eps (/255)": "", "mean": 0.8},
            {"model": "original", "attack": "pgd-10", "eps (/255)": "1", "mean": 0.3},
        ],
        tmp_path / "matrix.png",
    )
    report.plot_compare(
        {
            "dataset": "zero-shot mean",
            "original clean": (0.8, None),
            "original robust": (0.3, None),
            "agft clean": (0.75, 0.01),
            "agft robust": (0.35, 0.02),
        },
        tmp_path / "compare.png",
        "t",
    )
    report.plot_world(tmp_path / "world.png", world_seed=0, per_row=2)
    for name in (
        "accuracy",
        "timeline",
        "calibration",
        "frontier",
        "robust_vs_calibration.gamma",
        "matrix",
        "compare",
        "world",
    ):
        _opens(tmp_path / f"{name}.png")


def test_table_formats_numbers_and_keeps_text():
    rows = [{"dataset": "shapes", "agft clean": "58.10 ± 0.17", "clean": 0.58123, "n": 3, "note": None}]
    markdown = report.table(rows, percent=True)
    header, rule, line = markdown.strip().splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == ["dataset", "agft clean", "clean", "n", "note"]
    assert [c.strip() for c in line.strip("|").split("|")] == ["shapes", "58.10 ± 0.17", "58.12", "3", ""]
    assert "0.5812" in report.table(rows)  # fractions to 4 places without percent
    console = report.table(rows, markdown=False)
    assert "|" not in console and console.splitlines()[2].split() == ["shapes", "58.10", "±", "0.17", "0.5812", "3"]


def test_an_empty_table_is_an_empty_string():
    assert report.table([]).strip() == ""


def test_a_log_file_gets_plain_progress_lines_for_long_work_and_none_for_short(monkeypatch, capsys):
    from pipeline import remote

    clock = [100.0]
    monkeypatch.setattr(remote.time, "monotonic", lambda: clock[0])
    quick = remote.LineProgress(4, "text caches")
    for _ in range(4):
        quick.update(1)
    assert capsys.readouterr().err == ""  # done within QUIET_S: nothing to report
    slow = remote.LineProgress(4, "teacher cache")
    for _ in range(4):
        clock[0] += 6
        slow.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "teacher cache: 2/4 tasks (50 %, 12 s)",
        "teacher cache: 3/4 tasks (75 %, 18 s)",
        "teacher cache: 4/4 tasks (100 %, 24 s)",
    ]
