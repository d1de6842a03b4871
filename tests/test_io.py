"""granular.save / granular.load: readable source + safetensors, loadable without granular."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import granular.io as gio
from granular.errors import GranularError


# --------------------------------------------------------------------------------------------
# Test models
# --------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(6, eps=1e-3, momentum=0.3)
        self.act2 = nn.ReLU6()

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


class CatScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 3, padding=1, dilation=1)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.act(y * 0.5)


class PoolHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avgpool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d((2, 2))
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(16, 5)
        self.act = nn.Hardswish()

    def forward(self, x):
        y = self.avgpool(self.maxpool(self.conv(x)))
        return self.fc(self.drop(self.flatten(self.act(self.gap(y)))))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn = nn.BatchNorm2d(6, affine=False)
        self.pw = nn.Conv2d(6, 4, 1)
        self.act = nn.SiLU()
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        y = self.act(self.bn(self.dw(x)))
        return self.pw(y) * self.gate(y.mean(dim=1, keepdim=True))


class Nested(nn.Module):
    """Submodule names with numeric components: ModuleDict -> ModuleList -> Sequential."""

    def __init__(self):
        super().__init__()
        self.cells = nn.ModuleDict({
            "e0_2": nn.ModuleList([
                nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                              nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)),
                nn.Sequential(nn.Identity()),
            ]),
            "skip": nn.ModuleList([nn.Sequential(nn.Tanh(), nn.Sigmoid())]),
        })
        self.norm = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm([4, 5, 5])

    def forward(self, x):
        a = self.cells["e0_2"][0](x) + self.cells["e0_2"][1](x)
        b = self.cells["skip"][0](x)
        return self.ln(self.norm(a + b))


class RootTensors(nn.Module):
    """A buffer and a parameter on the root, read through get_attr."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, 4).reshape(1, 4, 1, 1))
        self.gain = nn.Parameter(torch.full((1, 4, 1, 1), 1.5))

    def forward(self, x):
        return self.conv(x) * self.gain + self.offset


INPUT_SHAPES = {
    ConvBNReLU: (2, 3, 8, 8),
    Residual: (2, 3, 8, 8),
    CatScale: (2, 3, 8, 8),
    PoolHead: (2, 3, 8, 8),
    Depthwise: (2, 6, 8, 8),
    Nested: (2, 4, 5, 5),
    RootTensors: (2, 3, 8, 8),
}


def _make(cls: type[nn.Module]) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(*INPUT_SHAPES[cls])
    # A few training steps' worth of forward passes give non-trivial running statistics.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*INPUT_SHAPES[cls]) * 2 + 0.5)
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    gm.eval()
    return gm, x


def _assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) or set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(INPUT_SHAPES), ids=lambda c: c.__name__)
def test_round_trip_outputs_equal(cls, tmp_path):
    gm, x = _make(cls)
    out_dir = gio.save(gm, tmp_path / "nested" / "dir")
    assert out_dir == tmp_path / "nested" / "dir"
    for name in ("model.py", "model.safetensors", "granular.json"):
        assert (out_dir / name).is_file()
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]

    loaded = gio.load(out_dir)
    assert not loaded.training
    assert not isinstance(loaded, torch.fx.GraphModule)
    _assert_state_equal(gm, loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)


def test_model_py_is_readable_torch_only(tmp_path):
    gm, _ = _make(Nested)
    source = (gio.save(gm, tmp_path / "m") / "model.py").read_text()
    assert "class CompactModel(torch.nn.Module):" in source
    assert "\ndef load(directory" in source
    assert "granular" not in source.split('"""', 2)[2]  # nothing after the docstring
    assert "add_module('e0_2', torch.nn.Module())" in source
    assert "torch.nn.Conv2d(in_channels=4, out_channels=4" in source
    import_lines = [line for line in source.splitlines()
                    if line.startswith(("import ", "from "))]
    assert import_lines == ["import torch"]


def test_batchnorm_running_stats_round_trip(tmp_path):
    gm, _ = _make(ConvBNReLU)
    bn = gm.bn1
    assert int(bn.num_batches_tracked) == 3
    loaded = gio.load(gio.save(gm, tmp_path / "bn"))
    lbn = loaded.get_submodule("bn1")
    assert lbn.num_batches_tracked.dtype == torch.long
    assert int(lbn.num_batches_tracked) == 3
    torch.testing.assert_close(lbn.running_mean, bn.running_mean, atol=0, rtol=0)
    torch.testing.assert_close(lbn.running_var, bn.running_var, atol=0, rtol=0)
    assert loaded.get_submodule("bn2").momentum == 0.3
    assert loaded.get_submodule("bn2").eps == 1e-3


def test_dtype_preserved(tmp_path):
    gm, x = _make(RootTensors)
    gm = gm.to(torch.float64)
    loaded = gio.load(gio.save(gm, tmp_path / "f64"))
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float64, name
    x = x.double()
    torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)


def test_affine_false_bn_has_no_params(tmp_path):
    gm, _ = _make(Depthwise)
    loaded = gio.load(gio.save(gm, tmp_path / "dw"))
    bn = loaded.get_submodule("bn")
    assert bn.weight is None and bn.bias is None
    assert bn.running_mean is not None
    assert loaded.get_submodule("dw").groups == 6


def test_root_tensors_are_registered(tmp_path):
    gm, _ = _make(RootTensors)
    loaded = gio.load(gio.save(gm, tmp_path / "root"))
    assert "offset" in dict(loaded.named_buffers())
    assert "gain" in dict(loaded.named_parameters())


def test_nonpersistent_tensor_constant_round_trips(tmp_path):
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(4.0), persistent=False)

        def forward(self, x):
            return x * self.table

    gm = torch.fx.symbolic_trace(WithConstant())
    loaded = gio.load(gio.save(gm, tmp_path / "c"))
    assert "table" not in loaded.state_dict()
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)


def test_shared_tensors_are_saved(tmp_path):
    gm, x = _make(Residual)
    gm.conv.bias = nn.Parameter(gm.bn.bias.detach()[:3])  # a view sharing storage
    loaded = gio.load(gio.save(gm, tmp_path / "shared"))
    torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)


def test_stdlib_global_is_imported(tmp_path):
    import math

    class UsesMath(nn.Module):
        def forward(self, x):
            return x * math.sqrt(x.size(1))

    gm = torch.fx.symbolic_trace(UsesMath())
    out_dir = gio.save(gm, tmp_path / "math")
    source = (out_dir / "model.py").read_text()
    assert "from math import sqrt as math_sqrt" in source
    x = torch.randn(2, 9)
    torch.testing.assert_close(gio.load(out_dir)(x), gm(x), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# granular.json
# --------------------------------------------------------------------------------------------


def test_granular_json_counts(tmp_path):
    gm, _ = _make(PoolHead)
    with torch.no_grad():
        gm.fc.weight[:2].zero_()
    out_dir = gio.save(gm, tmp_path / "j", metadata={"target": 0.5, "spec": "demo"})
    info = json.loads((out_dir / "granular.json").read_text())
    total = sum(p.numel() for p in gm.parameters())
    nonzero = sum(int((p != 0).sum()) for p in gm.parameters())
    assert info["format_version"] == gio.SAVE_FORMAT_VERSION
    assert info["torch_version"] == torch.__version__
    assert info["parameters"] == total == 4 * 3 * 9 + 4 + 16 * 5 + 5
    assert info["nonzero_parameters"] == nonzero == total - 2 * 16
    assert info["metadata"] == {"target": 0.5, "spec": "demo"}
    assert (out_dir / "granular.json").read_text().startswith('{\n  "format_version"')


def test_metadata_defaults_to_empty(tmp_path):
    gm, _ = _make(Residual)
    info = json.loads((gio.save(gm, tmp_path / "e") / "granular.json").read_text())
    assert info["metadata"] == {}


def test_save_overwrites_existing_directory(tmp_path):
    gm, x = _make(Residual)
    gio.save(gm, tmp_path / "o")
    with torch.no_grad():
        gm.conv.weight.mul_(2)
    loaded = gio.load(gio.save(gm, tmp_path / "o"))
    torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class _UserLeaf(nn.Module):
    """A user's own module kept whole while tracing: model.py cannot rebuild it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.w


def test_user_leaf_module_type_raises(tmp_path):
    class WithUserLeaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_UserLeaf()])

        def forward(self, x):
            return self.blocks[0](x)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, _UserLeaf) or super().is_leaf_module(m, name)

    model = WithUserLeaf()
    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    with pytest.raises(GranularError) as info:
        gio.save(gm, tmp_path / "bad")
    message = str(info.value)
    assert "\n" not in message
    assert "blocks.0" in message and "_UserLeaf" in message
    assert not (tmp_path / "bad" / "model.py").exists()


def test_library_leaf_without_constructor_is_pickled_and_reloads(tmp_path):
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Embedding(10, 4)])

        def forward(self, x):
            return self.blocks[0](x)

    gm = torch.fx.symbolic_trace(WithEmbedding())
    gio.save(gm, tmp_path / "emb")
    assert (tmp_path / "emb" / "leaves.pt").is_file()
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(gio.load(tmp_path / "emb")(x), gm(x), rtol=0, atol=0)


class _MyConv(nn.Conv2d):
    pass


class _SubclassUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _MyConv(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


def test_subclass_of_supported_type_is_rejected(tmp_path):
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, _MyConv) or super().is_leaf_module(m, qualname)

    root = _SubclassUser()
    gm = torch.fx.GraphModule(root, LeafTracer().trace(root))
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    with pytest.raises(GranularError, match="MyConv"):
        gio.save(gm, tmp_path / "sub")


def test_traced_through_subclass_is_saved(tmp_path):
    # symbolic_trace traces into the subclass: its weights become get_attr nodes.
    gm = torch.fx.symbolic_trace(_SubclassUser())
    loaded = gio.load(gio.save(gm, tmp_path / "traced"))
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)


def test_unimportable_global_raises(tmp_path):
    def local_fn(x):
        return x + 1

    class M(nn.Module):
        def forward(self, x):
            return x.relu()

    gm = torch.fx.symbolic_trace(M())
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        node = graph.call_function(local_fn, (out.args[0],))
    out.args = (node,)
    gm.recompile()
    with pytest.raises(GranularError) as info:
        gio.save(gm, tmp_path / "g")
    assert "local_fn" in str(info.value) and "\n" not in str(info.value)


def test_save_rejects_plain_module(tmp_path):
    with pytest.raises(GranularError, match="GraphModule"):
        gio.save(Residual(), tmp_path / "p")


def test_load_missing_directory_raises(tmp_path):
    with pytest.raises(GranularError) as info:
        gio.load(tmp_path / "does-not-exist")
    message = str(info.value)
    assert "\n" not in message and "does-not-exist" in message


def test_load_missing_file_raises(tmp_path):
    gm, _ = _make(Residual)
    out_dir = gio.save(gm, tmp_path / "m")
    (out_dir / "model.safetensors").unlink()
    with pytest.raises(GranularError, match="model.safetensors") as info:
        gio.load(out_dir)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Loading without granular
# --------------------------------------------------------------------------------------------

_SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import importlib.util
    import sys


    class BlockGranular(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "granular" or fullname.startswith("granular."):
                raise ImportError(f"granular is blocked in this test: {fullname}")
            return None


    sys.meta_path.insert(0, BlockGranular())
    for name in [m for m in sys.modules if m == "granular" or m.startswith("granular.")]:
        del sys.modules[name]
    try:
        import granular  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("granular could still be imported")

    import torch

    model_dir, input_file, expected_file = sys.argv[1:4]
    spec = importlib.util.spec_from_file_location("shipped_model", model_dir + "/model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.load()
    assert not model.training
    x = torch.load(input_file)
    expected = torch.load(expected_file)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert not any(m == "granular" or m.startswith("granular.") for m in sys.modules)
    print("LOADED-OK", type(model).__name__)
    """
)


def test_load_in_subprocess_without_granular(tmp_path):
    gm, x = _make(Nested)
    out_dir = gio.save(gm, tmp_path / "ship")
    with torch.no_grad():
        expected = gm(x)
    torch.save(x, tmp_path / "input.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = tmp_path / "check.py"
    script.write_text(_SUBPROCESS_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(out_dir), str(tmp_path / "input.pt"),
         str(tmp_path / "expected.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOADED-OK CompactModel" in result.stdout
