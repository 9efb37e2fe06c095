"""pleas_fx.save / pleas_fx.load: folder layout, bit-exact round trips, refusals."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import pleas_fx
from pleas_fx.errors import PleasError, WeightError
from pleas_fx.io import SaveError, load, save

torch.set_num_threads(1)
REPO = Path(pleas_fx.__file__).resolve().parent.parent
EXPECTED_FILES = {"model.py", "graph.json", "weights.safetensors", "report.json"}


# ----------------------------------------------------------------------------- networks
class RandomNet(nn.Module):
    """A network whose blocks are drawn at random from `seed`: plain, depthwise, residual,
    concatenated, chunked, layer-scaled and channel-shuffled convolutions, and a head."""

    def __init__(self, seed: int, in_ch: int = 3, classes: int = 5):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def pick(n):
            return int(torch.randint(n, (1,), generator=gen))

        width = 4 + 2 * pick(3)
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1, bias=bool(pick(2)))
        self.blocks = nn.ModuleList()
        self.kinds = []
        for _ in range(3 + pick(3)):
            kind = ["plain", "depthwise", "residual", "concat", "chunk", "scale", "shuffle"][pick(7)]
            act = [nn.ReLU(), nn.GELU(approximate="tanh"), nn.LeakyReLU(0.1), nn.SiLU(), nn.Hardswish()][pick(5)]
            block = nn.Module()
            if kind == "plain":
                block.conv = nn.Conv2d(width, width + 2, 3, stride=1 + pick(2), padding=1)
                block.bn = nn.BatchNorm2d(width + 2, momentum=None if pick(2) else 0.1)
                width += 2
            elif kind == "depthwise":
                block.conv = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
                block.bn = nn.BatchNorm2d(width)
            elif kind == "residual":
                block.conv = nn.Conv2d(width, width, 3, padding=2, dilation=2)
                block.bn = nn.GroupNorm(2, width)
            elif kind == "concat":
                block.conv = nn.Conv2d(width, width, 1)
                block.bn = nn.Identity()
                width *= 2
            elif kind == "chunk":
                even = width + width % 2
                block.conv = nn.Conv2d(width, even, 3, padding=1)
                block.bn = nn.Dropout(0.2)
                width = even // 2
            elif kind == "scale":
                block.conv = nn.Conv2d(width, width, 1)
                block.bn = nn.BatchNorm2d(width)
                block.gamma = nn.Parameter(torch.randn(width, 1, 1, generator=gen))
            else:  # shuffle: view / permute by shape read from the tensor
                even = width + width % 2
                block.conv = nn.Conv2d(width, even, 1)
                block.bn = nn.BatchNorm2d(even)
                width = even
            block.act = act
            self.blocks.append(block)
            self.kinds.append(kind)
        self.pool = nn.AdaptiveAvgPool2d(1) if pick(2) else nn.AdaptiveMaxPool2d(1)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes, bias=bool(pick(2)))
        self.register_buffer("offset", torch.randn(classes, generator=gen), persistent=False)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0, 0.1, generator=gen)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1, generator=gen)
                    m.running_var.uniform_(0.5, 1.5, generator=gen)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for kind, block in zip(self.kinds, self.blocks):
            y = block.act(block.bn(block.conv(x)))
            if kind == "residual":
                x = x + y
            elif kind == "concat":
                x = torch.cat([x, y], dim=1)
            elif kind == "chunk":
                a, b = y.chunk(2, dim=1)
                x = a * torch.sigmoid(b)
            elif kind == "scale":
                x = x + block.gamma * y
            elif kind == "shuffle":
                n, c, h, w = y.shape
                x = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            else:
                x = y
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.norm(x)) + self.offset


class TiedNet(nn.Module):
    """Tied weights (one Parameter under two names) and a max-pooled MLP."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(12, 6)
        self.dec = nn.Linear(6, 12, bias=False)
        self.dec.weight = nn.Parameter(torch.randn(12, 6))
        self.out = nn.Linear(12, 3)
        self.tied = nn.Linear(6, 12, bias=False)
        self.tied.weight = self.dec.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a string annotation (future import)
        h = F.max_pool1d(x.flatten(1).unsqueeze(1), 2).squeeze(1)
        z = torch.tanh(self.enc(h))
        return self.out(self.dec(z) + self.tied(z) * 0.5)


def _small_cnn(width: int = 8, classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    ).eval()


def _assert_no_pickle(folder: Path) -> None:
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES
    for p in folder.iterdir():
        head = p.read_bytes()[:8]
        assert not head.startswith(b"\x80"), f"{p.name} looks like a pickle"
        assert not head.startswith(b"PK"), f"{p.name} looks like a torch.save zip archive"
    json.loads((folder / "graph.json").read_text())
    json.loads((folder / "report.json").read_text())
    # safetensors: 8-byte little-endian header length, then a JSON header
    raw = (folder / "weights.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert all("dtype" in v and "shape" in v for k, v in header.items() if k != "__metadata__")


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) or set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def merged_pair():
    torch.manual_seed(0)
    a = _small_cnn()
    torch.manual_seed(1)
    b = _small_cnn()
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 3, 16, 16, generator=gen) for _ in range(4)]
    return a, b, data


# -------------------------------------------------------------------------------- tests
def test_lazy_names():
    assert pleas_fx.save is save and pleas_fx.load is load


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_random_networks(tmp_path, seed):
    torch.manual_seed(seed)
    model = RandomNet(seed).eval()
    x = torch.randn(3, 3, 16, 16)
    path = save(model, tmp_path / "m", example_input=x)
    _assert_no_pickle(path)
    loaded = load(path)
    assert isinstance(loaded, fx.GraphModule) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        x2 = torch.randn(5, 3, 16, 16)  # another batch size: the graph is not specialised
        assert torch.equal(loaded(x2), model(x2))
    _same_state(fx.symbolic_trace(model), loaded)
    assert "offset" in dict(loaded.named_buffers()) and "offset" not in loaded.state_dict()  # non-persistent kept
    assert "def forward(self, x)" in (path / "model.py").read_text()


def test_round_trip_tied_weights_and_annotations(tmp_path, caplog):
    torch.manual_seed(0)
    model = TiedNet().eval()
    x = torch.randn(4, 3, 8)
    with caplog.at_level(logging.WARNING, logger="pleas_fx"):
        loaded = load(save(model, tmp_path / "m", example_input=x))
    assert not caplog.records  # the regenerated code is the model's own, annotations included
    assert loaded.code == fx.symbolic_trace(model).code and "Tensor" in loaded.code
    assert loaded.tied.weight is loaded.dec.weight
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_round_trip_torchvision(tmp_path, name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    path = save(model, tmp_path / name, example_input=x)
    _assert_no_pickle(path)
    loaded = load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _same_state(fx.symbolic_trace(model), loaded)


def test_round_trip_merged_models(tmp_path, merged_pair):
    a, b, data = merged_pair
    merged = pleas_fx.merge(a, b, data[0][:2], [1.0, 1.5], data=data, progress=False)
    x = torch.randn(6, 3, 16, 16)
    for i, m in enumerate(merged):
        path = save(m, tmp_path / f"m{i}")
        _assert_no_pickle(path)
        loaded = load(path)
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))
        _same_state(m, loaded)
        assert loaded.meta["pleas_fx"] == json.loads(json.dumps(m.meta["pleas_fx"]))
        assert loaded.code == m.code
        assert (path / "model.py").read_text().count("def forward") == 1


def test_load_needs_no_source_classes(tmp_path):
    """A fresh interpreter without this test module's classes loads the model bit for bit."""
    torch.manual_seed(3)
    model = RandomNet(3).eval()
    x = torch.randn(2, 3, 16, 16)
    path = save(model, tmp_path / "m", example_input=x)
    from safetensors.torch import save_file

    save_file({"x": x, "y": model(x).detach()}, str(tmp_path / "io.safetensors"))
    script = (
        "import sys, torch, pleas_fx\n"
        "from safetensors.torch import load_file\n"
        "torch.set_num_threads(1)\n"
        f"d = load_file({str(tmp_path / 'io.safetensors')!r})\n"
        f"m = pleas_fx.load({str(path)!r})\n"
        "assert not any('test_io' in k for k in sys.modules), 'test module imported'\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(d['x']), d['y']), (m(d['x']) - d['y']).abs().max()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_budget_sweep_equals_separate_merges(merged_pair):
    a, b, data = merged_pair
    budgets = [1.0, 1.25, 1.6, 2.0]
    sweep = pleas_fx.merge(a, b, data[0][:2], budgets, data=data, progress=False)
    assert isinstance(sweep, list) and len(sweep) == len(budgets)
    x = torch.randn(8, 3, 16, 16)
    for budget, m in zip(budgets, sweep):
        single = pleas_fx.merge(a, b, data[0][:2], budget, data=data, progress=False)
        assert m.meta["pleas_fx"]["requested_budget"] == budget
        assert [g["width"] for g in m.meta["pleas_fx"]["groups"]] == [g["width"] for g in single.meta["pleas_fx"]["groups"]]
        with torch.no_grad():
            assert (m(x) - single(x)).abs().max().item() < 1e-5
        for (k, t), (k2, t2) in zip(m.state_dict().items(), single.state_dict().items()):
            assert k == k2 and t.shape == t2.shape
            if t.is_floating_point():
                assert (t - t2).abs().max().item() < 1e-5, k


def test_refuses_weights_of_other_shapes(tmp_path, merged_pair):
    a, b, data = merged_pair
    m1, m2 = pleas_fx.merge(a, b, data[0][:2], [1.0, 1.6], data=data, progress=False, emit="dense")
    p1, p2 = save(m1, tmp_path / "m1"), save(m2, tmp_path / "m2")
    (p1 / "weights.safetensors").write_bytes((p2 / "weights.safetensors").read_bytes())
    with pytest.raises(WeightError, match=r"weights do not match the model code: .*has \S+ with shape \(\d+(, \d+)*\), but module"):
        load(p1)


def test_refuses_missing_or_extra_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _small_cnn()
    path = save(model, tmp_path / "m", example_input=torch.randn(2, 3, 16, 16))
    tensors = load_file(str(path / "weights.safetensors"))
    del tensors["4.running_var"]
    save_file(tensors, str(path / "weights.safetensors"))
    with pytest.raises(WeightError, match="missing 4.running_var"):
        load(path)
    tensors = load_file(str(tmp_path / "m" / "weights.safetensors"))
    tensors["4.running_var"] = torch.ones(16)
    tensors["extra"] = torch.ones(1)
    save_file(tensors, str(path / "weights.safetensors"))
    with pytest.raises(WeightError, match="unexpected extra"):
        load(path)


def test_refuses_weights_that_break_the_graph(tmp_path):
    """A tensor read by get_attr (a layer scale) has no layer to check it against: it is checked
    against graph.json, and the graph is run on meta tensors of the saved input shapes."""
    from safetensors.torch import load_file, save_file

    model = RandomNet(1).eval()
    assert model.kinds[2] == "scale"
    path = save(model, tmp_path / "m", example_input=torch.randn(2, 3, 16, 16))
    tensors = load_file(str(path / "weights.safetensors"))
    w = tensors["blocks.2.gamma"].shape[0]
    tensors["blocks.2.gamma"] = torch.randn(w + 1, 1, 1)
    save_file(tensors, str(path / "weights.safetensors"))
    with pytest.raises(WeightError, match=r"blocks.2.gamma with shape \(%d, 1, 1\), but graph.json needs" % (w + 1)):
        load(path)
    doc = json.loads((path / "graph.json").read_text())
    doc["tensors"]["blocks.2.gamma"]["shape"] = [w + 1, 1, 1]
    (path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(WeightError, match="running the graph on inputs of the saved shapes fails"):
        load(path)


@pytest.mark.parametrize("field,value,message", [
    ("function", "builtins.eval", "not in the allow-list"),
    ("function", "os.system", "not in the allow-list"),
    ("method", "__reduce_ex__", "not a public torch.Tensor method"),
    ("input", "x=__import__('os').system('true')", "not a Python identifier"),
    ("class", "subprocess.Popen", "not a torch.nn module class"),
    ("class", "torch.nn.modules.module.Module.__init__", "not a torch.nn module class"),
])
def test_refuses_names_outside_the_allow_list(tmp_path, field, value, message):
    model = RandomNet(1).eval()
    path = save(model, tmp_path / "m", example_input=torch.randn(2, 3, 16, 16))
    doc = json.loads((path / "graph.json").read_text())
    if field == "function":
        node = next(n for n in doc["graph"] if n["op"] == "call_function")
        node["target"] = value
    elif field == "method":
        node = next(n for n in doc["graph"] if n["op"] == "call_function")
        node["op"], node["target"] = "call_method", value
    elif field == "input":
        doc["graph"][0]["target"] = value
    else:
        doc["modules"]["stem"]["class"] = value
    (path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(PleasError, match=message):
        load(path)


def test_edited_model_py_is_not_executed(tmp_path, caplog):
    model = _small_cnn()
    x = torch.randn(2, 3, 16, 16)
    path = save(model, tmp_path / "m", example_input=x)
    (path / "model.py").write_text("raise SystemExit('model.py must never run')\n")
    with caplog.at_level(logging.WARNING, logger="pleas_fx"):
        loaded = load(path)
    assert torch.equal(loaded(x), model(x))
    assert any("model.py" in r.getMessage() for r in caplog.records)


class _Opaque(nn.Module):
    def forward(self, x):
        return x * 2


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _Opaque) or super().is_leaf_module(m, qualname)


@fx.wrap
def _user_function(x):
    return x + 1


def test_save_refuses_what_load_cannot_rebuild(tmp_path):
    root = nn.Sequential(nn.Linear(4, 4), _Opaque())
    gm = fx.GraphModule(root, _LeafTracer().trace(root))
    with pytest.raises(SaveError, match="not a torch.nn module class"):
        save(gm, tmp_path / "a")

    class UsesWrapped(nn.Module):
        def forward(self, x):
            return _user_function(x)

    with pytest.raises(SaveError, match="not in the allow-list"):
        save(UsesWrapped(), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folders left behind


def test_save_does_not_clobber(tmp_path):
    model = _small_cnn()
    path = save(model, tmp_path / "m")
    with pytest.raises(FileExistsError):
        save(model, path)
    other = _small_cnn(classes=3)
    save(other, path, overwrite=True)
    assert load(path)(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_saved_files_are_readable(tmp_path, merged_pair):
    a, b, data = merged_pair
    m = pleas_fx.merge(a, b, data[0][:2], 1.3, data=data, progress=False)
    path = save(m, tmp_path / "m")
    code = (path / "model.py").read_text()
    assert "class " in code and "def forward(self" in code and "load() never executes it" in code
    graph_lines = (path / "graph.json").read_text().splitlines()
    assert any('"class": "torch.nn.Conv2d"' in line for line in graph_lines)  # one module per line
    report = json.loads((path / "report.json").read_text())
    assert report["groups"] and all("width" in g for g in report["groups"])
