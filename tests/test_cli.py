"""The pleas-fx command: end to end runs and one-line refusals of bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import pleas_fx
import pleas_fx.io
from pleas_fx.apps import cli

torch.set_num_threads(1)
REPO = Path(pleas_fx.__file__).resolve().parent.parent
NETS = "pleas_fx_cli_testnets"
FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def make(num_classes=3, width=8):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    class Flip(nn.Module):
        def forward(self, x):
            return torch.flip(x, dims=(1,))

    def make_rolled(num_classes=3, width=8):
        m = make(num_classes, width)
        return nn.Sequential(*m[:3], Flip(), *m[3:])
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two small trained checkpoints in both formats, tensor files and image folders."""
    from PIL import Image
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cli")
    (root / f"{NETS}.py").write_text(FACTORY)
    sys.path.insert(0, str(root))
    mod = __import__(NETS)
    gen = torch.Generator().manual_seed(0)
    # a learnable task: the class is which third of the image is brightest
    x = torch.randn(90, 3, 16, 16, generator=gen) * 0.5
    y = torch.arange(90) % 3
    for i in range(90):
        x[i, :, :, 5 * int(y[i]):5 * int(y[i]) + 5] += 1.5
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = mod.make()
        opt = torch.optim.Adam(m.parameters(), lr=0.02)
        for _ in range(15):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        models.append(m.eval())
    torch.save(models[0].state_dict(), root / "a.pt")
    torch.save(models[1].state_dict(), root / "b.pth")
    save_file(models[0].state_dict(), str(root / "a.safetensors"))
    save_file(models[1].state_dict(), str(root / "b.safetensors"))
    torch.manual_seed(5)
    torch.save(mod.make(width=4).state_dict(), root / "narrow.pt")  # wrong shapes
    torch.save({f"layer.{k}": v for k, v in models[0].state_dict().items()}, root / "renamed.pt")  # wrong keys
    torch.save(x[:40], root / "inputs.pt")
    torch.save({"x": x[40:], "y": y[40:]}, root / "labelled.pt")
    np.save(root / "inputs.npy", x[:20].numpy())
    # images: ImageFolder layout (3 classes) and a flat folder
    pixels = ((x[:30].clamp(-2, 2) + 2) / 4 * 255).byte().permute(0, 2, 3, 1).numpy()
    for i in range(30):
        d = root / "images" / f"class{int(y[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(d / f"{i}.png")
        (root / "flat").mkdir(exist_ok=True)
        Image.fromarray(pixels[i]).save(root / "flat" / f"{i}.png")
    yield root
    sys.path.remove(str(root))
    sys.modules.pop(NETS, None)


def _run(argv, capsys):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _merge_args(files, out, *extra, a="a.pt", b="b.safetensors", data="images"):
    return ["merge", f"{NETS}:make", "--a", files / a, "--b", files / b, "--data", files / data,
            "--image-size", 16, "--batch-size", 8, "--out", out, *extra]


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_end_to_end_command(files, tmp_path):
    """The console command in a fresh process (the installed pleas-fx script if there is one):
    image folder data, both checkpoint formats, a sweep of budgets, evaluation and the plot."""
    out = tmp_path / "run"
    args = _merge_args(files, out, "--budget", "1.0", "--budget", "1.5", "--budget", "2",
                       "--eval", files / "labelled.pt", a="a.pt", b="b.safetensors", data="images")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(files)]), "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).parent / "pleas-fx"  # the console script, when the package is installed
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "pleas_fx"]
    res = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "budget_1.5" in res.stdout and "report.json" in res.stdout
    assert "\r" not in res.stderr  # no progress bars when stderr is not a terminal
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy.png", "budget_1", "budget_1.5", "budget_2", "report.json"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(tmp_path, "run") == []

    report = json.loads((out / "report.json").read_text())
    assert report["budgets"] == [1.0, 1.5, 2.0]
    assert {"load_models", "merge", "save", "evaluate", "total"} <= set(report["timings"])
    for entry in report["models"]:
        assert entry["groups"] and all(isinstance(g["width"], int) for g in entry["groups"])
        assert entry["achieved_budget"] <= entry["budget"] + 1e-9
        assert "statistics" in entry["timings"]
    acc = report["evaluation"]["accuracy"]
    assert report["evaluation"]["samples"] == 50
    assert set(acc) == {"model_a", "model_b", "ensemble", "merged"} and len(acc["merged"]) == 3
    assert acc["model_a"] > 60 and acc["model_b"] > 60  # the trained models learned the task

    # every saved model loads; budget 2 is the ensemble
    from pleas_fx.apps.checkpoints import build_model, load_checkpoint

    xy = torch.load(files / "labelled.pt")
    ma = load_checkpoint(build_model(f"{NETS}:make"), files / "a.pt")
    mb = load_checkpoint(build_model(f"{NETS}:make"), files / "b.safetensors")
    with torch.no_grad():
        ensemble = 0.5 * (ma(xy["x"]) + mb(xy["x"]))
        for b in ("1", "1.5", "2"):
            m = pleas_fx.load(out / f"budget_{b}")
            assert m.meta["pleas_fx"]["requested_budget"] == float(b)
            logits = m(xy["x"])
            assert logits.shape == (50, 3)
        assert (logits - ensemble).abs().max().item() < 1e-4
    merged_acc = {p["budget"]: p["accuracy"] for p in acc["merged"]}
    assert abs(merged_acc[2.0] - acc["ensemble"]) < 1e-9


def test_tensor_file_and_other_checkpoint_formats(files, tmp_path, capsys):
    out = tmp_path / "t"
    status, stdout, err = _run(_merge_args(files, out, "--budget", "1.2", "--quiet", "--batches", "2", "--distill", "2",
                                           a="a.safetensors", b="b.pth", data="inputs.pt"), capsys)
    assert status == 0, err
    assert err == ""  # --quiet: nothing on stderr
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["statistics"]["batches"] == 1  # 2 batches of 8: one chunk held out of the merge
    assert report["models"][0]["distill"]["epochs"] == 2  # and one trained on
    assert report["models"][0]["distill"]["steps"] == 2
    assert "distilled, held-out loss per budget: 1.2: " in stdout
    assert report["evaluation"] is None and not (out / "accuracy.png").exists()
    pleas_fx.load(out / "budget_1.2")


def test_no_mixup_turns_the_top_up_off(files, tmp_path, capsys, monkeypatch):
    seen = {}
    original = pleas_fx.merge

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(pleas_fx, "merge", spy)
    status, _, err = _run(_merge_args(files, tmp_path / "m", "--budget", "1.2", "--quiet", "--batches", "2",
                                      "--no-mixup"), capsys)
    assert status == 0, err
    assert seen["mixup"] is False


@pytest.mark.parametrize("data", ["inputs.npy", "flat", "generated"])
def test_other_data_sources(files, tmp_path, capsys, data):
    out = tmp_path / "d"
    argv = _merge_args(files, out, "--budget", "1.5", "--quiet", "--batches", "2", data=data)
    if data == "generated":
        argv[argv.index("--data") + 1] = "generated"
    status, _, err = _run(argv, capsys)
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["matching"] == ("weight" if data == "generated" else "activation")
    assert (out / "budget_1.5" / "weights.safetensors").is_file()


def _bad_folder(files, tmp_path, kind):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(files / "images", folder)
    if kind == "text":
        (folder / "class0" / "notes.txt").write_text("not an image")
    else:
        (folder / "class1" / "broken.png").write_bytes(b"this is not a png")
    return folder


@pytest.mark.parametrize("case,message", [
    ("wrong keys", r"does not fit model .*missing keys: 0\.weight, 1\.weight, 1\.bias \(\+\d+ more\); unexpected keys: layer\.0\.weight"),
    ("wrong shapes", r"does not fit model .*shape mismatches: 0\.weight is \(4, 3, 3, 3\) in the checkpoint, \(8, 3, 3, 3\) in the model"),
    ("missing file", r"checkpoint --b not found: .*nothere\.pt"),
    ("missing data", r"--data not found"),
    ("non-image files", r"holds files that are not images: class0/notes\.txt"),
    ("broken image", r"cannot read image .*broken\.png"),
    ("budget above 2", r"budget 2\.5 is outside \[1, 2\]"),
    ("budget below 1", r"budget 0\.5 is outside \[1, 2\]"),
    ("budget not a number", r"invalid float value: 'big'"),
    ("unknown model", r"unknown model 'no_such_net_xyz'"),
    ("bad model kwargs", r"--model-kwargs is not valid JSON"),
    ("eval without labels", r"--eval .* has no labels"),
    ("pickled model", r"cannot read checkpoint .*weights_only"),
    ("negative distill", r"distill must be an integer >= 0 \(epochs; 0: off\), got -1"),
])
def test_bad_input_exits_with_one_line(files, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    argv = _merge_args(files, out, "--budget", "1.5", "--quiet")
    a_at, b_at, data_at = argv.index("--a") + 1, argv.index("--b") + 1, argv.index("--data") + 1
    if case == "wrong keys":
        argv[a_at] = files / "renamed.pt"
    elif case == "wrong shapes":
        argv[b_at] = files / "narrow.pt"
    elif case == "missing file":
        argv[b_at] = files / "nothere.pt"
    elif case == "missing data":
        argv[data_at] = files / "nothere"
    elif case == "non-image files":
        argv[data_at] = _bad_folder(files, tmp_path, "text")
    elif case == "broken image":
        argv[data_at] = _bad_folder(files, tmp_path, "broken")
        argv += ["--batch-size", "64"]  # every image is read in the statistics pass
    elif case == "budget above 2":
        argv += ["--budget", "2.5"]
    elif case == "budget below 1":
        argv[argv.index("--budget") + 1] = "0.5"
    elif case == "budget not a number":
        argv += ["--budget", "big"]
    elif case == "unknown model":
        argv[1] = "no_such_net_xyz"
    elif case == "bad model kwargs":
        argv += ["--model-kwargs", "{num_classes: 3}"]
    elif case == "eval without labels":
        argv += ["--eval", files / "inputs.pt"]
    elif case == "negative distill":
        argv += ["--distill", "-1"]
    elif case == "pickled model":
        bad = tmp_path / "model.pt"
        torch.save(__import__(NETS).make(), bad)
        argv[a_at] = bad
    status, stdout, err = _run(argv, capsys)
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pleas-fx") and "error:" in lines[0]
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()
    assert _leftovers(tmp_path, "out") == []


def test_existing_output_is_kept_unless_forced(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, _, err = _run(_merge_args(files, out, "--budget", "1.5", "--quiet", "--batches", "1"), capsys)
    assert status == 1 and "exists and is not empty" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    status, _, err = _run(_merge_args(files, out, "--budget", "1.5", "--quiet", "--batches", "1", "--force"), capsys)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["budget_1.5", "report.json"]
    assert _leftovers(tmp_path, "out") == []


def test_failure_after_merge_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    """An error while writing (here: in save) removes the partial output."""
    out = tmp_path / "out"
    calls = []

    def failing_save(model, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(model, path, **kw)

    real_save = pleas_fx.io.save
    monkeypatch.setattr(pleas_fx.io, "save", failing_save)
    status, _, err = _run(_merge_args(files, out, "--budget", "1.2", "--budget", "1.8", "--quiet", "--batches", "1"), capsys)
    assert status == 1 and "disk full" in err
    assert len(calls) == 2 and not out.exists() and _leftovers(tmp_path, "out") == []


def test_frozen_units_are_reported_in_one_line(files, tmp_path, capsys):
    mod = sys.modules[NETS]
    for i, name in enumerate(("ra.pt", "rb.pt")):
        torch.manual_seed(i)
        torch.save(mod.make_rolled().state_dict(), tmp_path / name)
    argv = ["merge", f"{NETS}:make_rolled", "--a", tmp_path / "ra.pt", "--b", tmp_path / "rb.pt", "--data",
            files / "inputs.pt", "--batch-size", 8, "--budget", "1.5", "--out", tmp_path / "out", "--quiet"]
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    lines = [line for line in out.splitlines() if "frozen:" in line]
    assert len(lines) == 1 and "16 of 32 hidden units (50.0%)" in lines[0] and "no handler for function torch.flip" in lines[0]
    status, out, _ = _run(_merge_args(files, tmp_path / "out2", "--budget", "1.5", "--quiet", "--batches", "1"), capsys)
    assert status == 0 and "frozen:" not in out


def test_inspect_is_dispatched(monkeypatch):
    seen = {}
    fake = types.ModuleType("pleas_fx.apps.inspect_command")

    def fake_main(argv, prog="x"):
        seen["argv"], seen["prog"] = list(argv), prog
        return 3

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "pleas_fx.apps.inspect_command", fake)
    assert cli.main(["inspect", "resnet18", "--input-shape", "1,3,8,8"]) == 3
    assert seen == {"argv": ["resnet18", "--input-shape", "1,3,8,8"], "prog": "pleas-fx inspect"}


def test_model_names_resolve(files):
    from pleas_fx.apps.checkpoints import ModelError, build_model

    assert type(build_model("resnet18", {"num_classes": 3})).__module__.startswith("torchvision")
    assert build_model(f"{NETS}:make", {"num_classes": 7})[-1].out_features == 7
    with pytest.raises(ModelError, match="has no attribute"):
        build_model(f"{NETS}:nothing")
    with pytest.raises(ModelError, match="cannot import"):
        build_model("no_such_package_xyz.mod:make")
