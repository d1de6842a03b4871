"""Deployment formats: ``save(..., format="pt2" | "onnx")`` and ``granular export --format``,
each run back and checked against the compact model before it is written; and the compact
model under ``torch.compile``."""

import json

import pytest
import torch

import granular
from granular.cli import main
from granular.errors import ExportError, GranularError

from _models import USER_MODELS, user_model


@pytest.fixture(scope="module")
def compact():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    gm = granular.prepare(user_model("resnet_like"), x)
    granular.testing.random_masks_(gm, op=0.3, filter=0.3, weight=0.3, seed=0)
    return granular.export(gm.eval()), x


def test_pt2_reloads_without_granular_and_computes_the_same(compact, tmp_path):
    model, x = compact
    granular.save(model, tmp_path, format="pt2", example_inputs=x)
    program = torch.export.load(tmp_path / "model.pt2").module()
    for batch in (x, torch.randn(7, 1, 8, 8)):  # the batch dimension is dynamic
        torch.testing.assert_close(program(batch), model(batch), rtol=1e-4, atol=1e-5)
    info = json.loads((tmp_path / "granular.json").read_text())
    assert info["format"] == "pt2" and info["nonzero_parameters"] > 0


def test_onnx_runs_in_onnxruntime_and_computes_the_same(compact, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the optional onnx extra: pip install 'granular[onnx]'")
    pytest.importorskip("onnxscript")
    model, x = compact
    granular.save(model, tmp_path, format="onnx", example_inputs=x)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (x, torch.randn(5, 1, 8, 8)):
        (out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(batch).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_example_of_one_sample_still_gives_a_dynamic_batch(compact, tmp_path, fmt):
    """Exporters specialise a batch of 1 into the program: the pt2 file took one sample only,
    and the dynamo ONNX exporter refused the dynamic batch, leaving the TorchScript fallback
    (which fails on torch 2.14 for ConvNeXt or DaViT). The file must take any batch."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the optional onnx extra: pip install 'granular[onnx]'")
        pytest.importorskip("onnxscript")
    model, x = compact
    granular.save(model, tmp_path, format=fmt, example_inputs=x[:1])
    batch = torch.randn(3, 1, 8, 8)
    if fmt == "pt2":
        out = torch.export.load(tmp_path / "model.pt2").module()(batch)
    else:
        import onnxruntime as ort
        session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])
    torch.testing.assert_close(out, model(batch).detach(), rtol=1e-4, atol=1e-5)


class _WithTable(torch.nn.Module):
    """Two inputs, only the first batched: the table must not be doubled or made dynamic."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, table):
        return self.fc(x + table)


class _OneSampleOnly(torch.nn.Module):
    """Flattens with a literal batch of 1: the file keeps that fixed batch."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.view(1, -1))


def test_inputs_without_the_batch_and_models_of_one_sample_export(tmp_path):
    table, model = torch.randn(4), _WithTable().eval()
    granular.save(model, tmp_path / "table", format="pt2", example_inputs=(torch.randn(1, 4), table))
    program = torch.export.load(tmp_path / "table" / "model.pt2").module()
    x = torch.randn(3, 4)
    torch.testing.assert_close(program(x, table), model(x, table))
    model = _OneSampleOnly().eval()
    granular.save(model, tmp_path / "one", format="pt2", example_inputs=torch.randn(1, 4))
    one = torch.randn(1, 4)
    torch.testing.assert_close(torch.export.load(tmp_path / "one" / "model.pt2").module()(one), model(one))


def test_a_format_that_computes_something_else_is_not_written(compact, tmp_path, monkeypatch):
    model, x = compact
    import granular.formats as formats
    real = formats._run_pt2
    monkeypatch.setattr(formats, "_run_pt2", lambda path, inputs: [t + 1.0 for t in real(path, inputs)])
    with pytest.raises(ExportError, match="pt2 export does not compute"):
        granular.save(model, tmp_path / "out", format="pt2", example_inputs=x)
    assert not (tmp_path / "out" / "model.pt2").exists()


def test_formats_need_an_example_batch(compact, tmp_path):
    with pytest.raises(GranularError, match="example_inputs"):
        granular.save(compact[0], tmp_path, format="pt2")


def test_export_command_writes_a_checked_pt2(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["search", USER_MODELS["resnet_like"], "--target-params", "6K", "--epochs", "3", "--warmup-epochs",
                 "1", "--prune-every", "1", "--batch-size", "480", "--out", str(run), "--no-progress"]) == 0
    assert main(["export", str(run), "--format", "pt2", "--out", str(tmp_path / "e")]) == 0
    program = torch.export.load(tmp_path / "e" / "model.pt2").module()
    py = granular.load(run / "model")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(program(x), py(x), rtol=1e-4, atol=1e-5)


def test_the_compact_model_captures_whole_under_torch_compile(compact):
    model, x = compact
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_compact_model_runs_under_inductor(compact):
    model, x = compact
    torch._dynamo.reset()
    compiled = torch.compile(model)  # inductor: C++ on CPU (about a minute here), Triton on a GPU
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_check_export_reports_each_format_apart_from_exactness(monkeypatch):
    from granular import formats

    x = torch.randn(2, 1, 8, 8)
    res = granular.testing.check_export(user_model("resnet_like"), x, formats=("pt2",))
    assert res.ok and res.formats == {"pt2": ""}
    monkeypatch.setattr(formats, "_run_pt2", lambda path, inputs: [torch.zeros(2, 10)])
    res = granular.testing.check_export(user_model("resnet_like"), x, formats=("pt2",))
    assert res.ok and "does not compute what the compact model does" in res.formats["pt2"]


class _WindowAttention(torch.nn.Module):
    """NesT's shape: attention over (batch, windows, heads, tokens, dim)."""

    def __init__(self):
        super().__init__()
        self.stem, self.qkv, self.proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)
        self.fc1, self.fc2, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)

    def forward(self, x):  # x: (B, W, N, 8)
        b, w, n, _ = x.shape
        h = self.stem(x)
        q, k, v = self.qkv(h).reshape(b, w, n, 3, 2, 4).permute(3, 0, 1, 4, 2, 5).unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(y.transpose(2, 3).reshape(b, w, n, 8))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


class _HeadsInBatch(torch.nn.Module):
    """SAM's shape: attention over (batch x heads, tokens, dim) with a 3-d bias as the mask."""

    def __init__(self):
        super().__init__()
        self.stem, self.qkv, self.proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)
        self.bias, self.head = torch.nn.Parameter(torch.randn(1, 5, 5)), torch.nn.Linear(8, 4)

    def forward(self, x):  # x: (B, N, 8)
        b, n, _ = x.shape
        h = self.stem(x)
        q, k, v = self.qkv(h).view(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).reshape(3, b * 2, n, 4).unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.expand(b * 2, n, n))
        h = h + self.proj(y.view(b, 2, n, 4).transpose(1, 2).reshape(b, n, 8))
        return self.head(h)


@pytest.mark.parametrize("cls, shape", [(_WindowAttention, (2, 3, 5, 8)), (_HeadsInBatch, (2, 5, 8))])
def test_attention_over_other_than_four_dimensions_exports_to_onnx(tmp_path, cls, shape):
    """The ONNX exporter translates 4-d attention only: save reshapes around it on a copy
    (NesT, Twins and SAM's ViT failed `--format onnx`, pruned or not); the model is unchanged."""
    ort = pytest.importorskip("onnxruntime", reason="the optional onnx extra: pip install 'granular[onnx]'")
    pytest.importorskip("onnxscript")
    from granular.passes.flatten_attention import needs_flattening
    x = torch.randn(*shape)
    gm = granular.prepare(cls().eval(), x)
    granular.testing.random_masks_(gm, op=0.0, filter=0.3, weight=0.3, seed=0)
    model = granular.export(gm.eval())
    assert any(needs_flattening(n) for n in model.graph.nodes)
    granular.save(model, tmp_path, format="onnx", example_inputs=x)
    assert any(needs_flattening(n) for n in model.graph.nodes)  # the copy was rewritten, not the model
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(4, *shape[1:])
    (out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(batch).detach(), rtol=1e-4, atol=1e-5)
