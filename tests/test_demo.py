"""The README's main commands: the built-in demo runs end to end and prints its table, and the
files it saves feed the `pleas-fx merge` command."""
from __future__ import annotations

import json
import re

from pleas_fx.apps import cli, demo


def test_demo_runs_and_its_files_feed_the_command(capsys, tmp_path):
    files = tmp_path / "demo"
    argv = ["--epochs", "1", "--budgets", "1", "1.5", "2", "--max-batches", "2", "--width", "8", "--quiet",
            "--save", str(files)]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)}
    for name in ("model A (digits 0-4)", "model B (digits 5-9)", "ensemble (2x)", "weight averaging (1x)",
                 "PLeaS 1x", "PLeaS 1.5x", "PLeaS 2x"):
        assert name in rows, name
    # each source model knows half of the classes: at most ~50% on all ten
    assert rows["model A (digits 0-4)"][0] <= 51 and rows["model B (digits 5-9)"][0] <= 51
    # budget honoured, and budget 2 is the ensemble (same predictions up to float ties)
    assert rows["PLeaS 1x"][1] == 1.0 and rows["PLeaS 1.5x"][1] <= 1.5 and rows["PLeaS 2x"][1] == 2.0
    assert abs(rows["PLeaS 2x"][0] - rows["ensemble (2x)"][0]) <= 0.2
    # aligned and solved, not averaged: even these one-epoch models merge well above weight
    # averaging (which is at chance)
    assert rows["PLeaS 1x"][0] >= rows["weight averaging (1x)"][0] + 5
    assert "one statistics pass" in out
    assert sorted(p.name for p in files.iterdir()) == ["calibration.pt", "model_a.pt", "model_b.pt", "test.pt"]

    merged = tmp_path / "merged"
    code = cli.main(["merge", "pleas_fx.apps.demo:DigitResNet", "--model-kwargs", '{"width": 8}',
                     "--a", str(files / "model_a.pt"), "--b", str(files / "model_b.pt"),
                     "--data", str(files / "calibration.pt"), "--batch-size", "100", "--batches", "2",
                     "--budget", "1", "--budget", "2", "--eval", str(files / "test.pt"), "--out", str(merged),
                     "--quiet"])
    assert code == 0
    report = json.loads((merged / "report.json").read_text())
    acc = report["evaluation"]["accuracy"]
    assert abs(acc["model_a"] - rows["model A (digits 0-4)"][0]) < 0.05
    assert abs({p["budget"]: p["accuracy"] for p in acc["merged"]}[2.0] - acc["ensemble"]) <= 0.2
    assert (merged / "accuracy.png").is_file()
