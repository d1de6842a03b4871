"""``granular report``: its plots show the metrics log, its tables the kept architecture,
and bad run directories get one line."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import granular
from granular.cli import main
from granular.report import group_arch, load_metrics, plot_params, plot_retention, plot_thresholds, report

from _models import USER_MODELS, assert_one_line_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    """A real search run directory: a small ResNet on digits, 3 epochs, a round after each but
    the first (large batches keep it to seconds)."""
    run = tmp_path_factory.mktemp("search") / "run"
    code = main(["search", USER_MODELS["resnet_like"], "--target-params", "4K", "--epochs", "3",
                 "--warmup-epochs", "1", "--prune-every", "1", "--batch-size", "480", "--out", str(run),
                 "--no-progress", "--seed", "1"])
    assert code == 0  # the last round lands on the target
    return run


@pytest.fixture
def run_dir(search_run, tmp_path):
    """A private copy of the search run, free to edit."""
    return shutil.copytree(search_run, tmp_path / "run")


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _write_rows(run, rows):
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _lines(ax):
    """y data of the axes' labelled lines (an unlabelled artist's label starts with ``_``)."""
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def _threshold_and_retention_lines(fig):
    """Lines by label of the threshold panel (with its ω axis) and of the retention panel."""
    thresholds, retention = {}, {}
    for ax in fig.axes:
        (retention if ax.get_title() == "retention ratio" else thresholds).update(_lines(ax))
    return thresholds, retention


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y), (a, b)


def test_report_writes_plots_and_tables_of_a_search(run_dir):
    result = report(run_dir)
    out = run_dir / "report"
    for name in ("thresholds.png", "params.png", "retention_by_cell.png"):
        _assert_png(out / name)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result))
    assert not list(out.glob("*.tmp"))

    arch = json.loads((run_dir / "arch.json").read_text())
    saved = json.loads((run_dir / "model" / "granular.json").read_text())
    assert result["grouped_by"] == "block" and result["missing"] == []
    names = [g["name"] for g in result["groups"]]
    assert names == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]
    # the blocks add up to the exported model, and each ratio is read off arch.json
    assert sum(g["params"] for g in result["groups"]) == result["total"]["params"] == saved["nonzero_parameters"]
    assert result["total"]["ops_total"] == len(arch["ops"])
    assert result["total"]["ops_kept"] == sum(op["kept"] for op in arch["ops"])
    kept = [layer for layer in arch["layers"].values() if layer["kept"]]
    assert result["total"]["filters_kept"] == sum(layer["width"] for layer in kept)
    assert result["total"]["filters_total"] == sum(layer["out_channels"] for layer in kept)
    block = next(g for g in result["groups"] if g["name"] == "layer2.0")
    assert block["ops_total"] == 2  # the residual branch and the projection shortcut
    summary = result["summary"]
    assert summary["params"] == arch["params"]["nonzero"] and summary["target"] == 4000
    assert summary["val_accuracy"] == saved["metadata"]["val_accuracy"]
    assert summary["epochs"] == len(_rows(run_dir)) and summary["finished"]


def test_plotted_data_equals_the_log(run_dir):
    rows = load_metrics(run_dir)
    assert rows == _rows(run_dir)
    fig = plot_thresholds(rows)
    thresholds, retention = _threshold_and_retention_lines(fig)
    for keep, thr, label in (("op", "alpha", "op (α)"), ("filter", "beta", "filter (β)"),
                             ("weight", "omega", "weight (ω)")):
        _same(retention[label], [r[f"keep_{keep}"] for r in rows])
        _same(thresholds[label], [r[f"threshold_{thr}"] for r in rows])
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [r["epoch"] for r in rows]

    ax = plot_params(rows).axes[0]
    lines = _lines(ax)
    assert lines["nonzero parameters"] == [r["params"] for r in rows]
    assert set(lines["target 4K"]) == {4000}
    rounds = next(c for c in ax.collections if c.get_label().startswith("pruning round")).get_offsets()
    assert [tuple(p) for p in rounds] == [(r["epoch"], r["params"]) for r in rows if "round" in r]
    assert len(rounds) == len(rows) - 1  # every epoch after the warm-up prunes


def test_changing_the_log_changes_the_plots(run_dir):
    before = report(run_dir)
    pngs = {k: (run_dir / "report" / f"{k}.png").read_bytes() for k in ("thresholds", "params")}
    rows = _rows(run_dir)
    for i, r in enumerate(rows):
        r["params"] = 9000 - 1000 * i
        r["keep_filter"] = 1.0 - 0.1 * i
    _write_rows(run_dir, rows)
    after = report(run_dir)
    assert after["summary"]["params"] == before["summary"]["params"]  # final count: arch.json
    for k, data in pngs.items():
        assert (run_dir / "report" / f"{k}.png").read_bytes() != data, k
    assert _lines(plot_params(load_metrics(run_dir)).axes[0])["nonzero parameters"] == [
        9000 - 1000 * i for i in range(len(rows))]
    _same(_threshold_and_retention_lines(plot_thresholds(load_metrics(run_dir)))[1]["filter (β)"],
          [1.0 - 0.1 * i for i in range(len(rows))])


def test_without_arch_json_the_log_is_still_plotted(run_dir, capsys):
    (run_dir / "arch.json").unlink()
    out = run_dir / "elsewhere"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "no arch.json" in captured.err and "metrics.jsonl" in captured.err
    assert "search not finished" in captured.out
    _assert_png(out / "thresholds.png")
    _assert_png(out / "params.png")
    assert not (out / "retention_by_cell.png").exists()
    saved = json.loads((out / "report.json").read_text())
    assert saved["groups"] == [] and saved["missing"] == ["arch.json"]
    assert saved["summary"]["params"] == _rows(run_dir)[-1]["params"]


def _darts_op(cell, op, kept):
    return {"unit": f"cells_{cell}_{op}", "path": f"cells.{cell}.edges.e0_2.ops.{op}", "kept": kept,
            "layers": {}, "cell": cell, "edge": "e0_2", "src": 0, "dst": 2, "op": op}


class _Layers(nn.Module):
    """Linear layers at the given module paths, every one used by ``forward``: a stand-in
    for an exported model, with the parameter names of a DARTS one."""

    def __init__(self, weights, biases):
        super().__init__()
        self.paths = list(weights)
        for path, w in weights.items():
            *parents, leaf = path.split(".")
            owner = self
            for name in parents:
                if not hasattr(owner, name):
                    owner.add_module(name, nn.Module())
                owner = getattr(owner, name)
            layer = nn.Linear(w.shape[1], w.shape[0], bias=path in biases)
            with torch.no_grad():
                layer.weight.copy_(w)
                if path in biases:
                    layer.bias.copy_(biases[path])
            owner.add_module(leaf, layer)

    def forward(self, x):
        return sum(self.get_submodule(p)(x[:, :self.get_submodule(p).in_features]).sum() for p in self.paths)


def _exported(weights, biases):
    return torch.fx.symbolic_trace(_Layers(weights, biases))


def _darts_run(tmp_path):
    """A DARTS-like run directory by hand: 3 cells (1 and 2 reduce), a log of 3 epochs, two stages."""
    run = tmp_path / "darts"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"spec": "darts:tiny"}))
    rows = [{"epoch": e, "phase": ph, "params": p, "target": 500, "val_acc": 0.5, "keep_op": k, "keep_filter": k,
             "keep_weight": 1.0, "threshold_alpha": 0.1 * e, "threshold_beta": 0.0, "threshold_omega": None,
             "stage": st, "stage_params": sp, "stage_goal": sg}
            for e, ph, p, k, st, sp, sg in ((1, "stage1-warmup", 900, 1.0, 1, 400, 200),
                                            (2, "stage1", 700, 0.8, 1, 200, 200),
                                            (3, "final", 480, 0.6, 2, None, None))]
    rows[1].update(round=1, landed=True, stage_end={"stage": 1, "epochs": 2},
                   regrowth={"quota": 1, "regrown_ops": ["cells_0_skip_connect"]})
    rows[2].update(round=2, landed=False)
    _write_rows(run, rows)
    ops = [_darts_op(0, "sep_conv_3x3", True), _darts_op(0, "skip_connect", False),
           _darts_op(0, "max_pool_3x3", True), _darts_op(1, "sep_conv_3x3", False),
           _darts_op(1, "skip_connect", True), _darts_op(2, "sep_conv_3x3", True),
           _darts_op(2, "sep_conv_3x3", True)]
    layers = {"stem.conv": {"kept": True, "out_channels": 8, "width": 8},
              "cells.0.preprocess0.op.1": {"kept": True, "out_channels": 8, "width": 6},
              "cells.0.edges.e0_2.ops.sep_conv_3x3.pw1": {"kept": True, "out_channels": 8, "width": 4},
              "cells.1.edges.e0_2.ops.sep_conv_3x3.pw1": {"kept": False, "out_channels": 8},
              "cells.1.preprocess1.op.1": {"kept": True, "out_channels": 8, "width": 8},
              "cells.2.preprocess1.op.1": {"kept": True, "out_channels": 8, "width": 2},
              "classifier": {"kept": True, "out_channels": 10, "width": 10}}
    arch = {"params": {"total": 600, "nonzero": 480}, "ops": ops, "layers": layers}
    (run / "arch.json").write_text(json.dumps(arch))
    weights = {"stem.conv": torch.ones(8, 9),
               "cells.0.preprocess0.op.1": torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(6, 2),  # half zero
               "cells.0.edges.e0_2.ops.sep_conv_3x3.pw1": torch.ones(4, 6),
               "cells.1.preprocess1.op.1": torch.zeros(8, 4).index_fill_(1, torch.tensor([0]), 1.0),
               "cells.2.preprocess1.op.1": torch.ones(2, 8), "classifier": torch.ones(10, 2)}
    biases = {"cells.2.preprocess1.op.1": torch.ones(2), "classifier": torch.zeros(10)}
    granular.save(_exported(weights, biases), run / "model")
    return run


def test_darts_cells_table_and_heat_map(tmp_path, capsys):
    run = _darts_run(tmp_path)
    # the table fits 80 columns (rich's width off a terminal), a cell's op types one per line
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    for text in ("cell 0", "cell 1 (reduction)", "cell 2 (reduction)", "max_pool_3x3 ×1", "sep_conv_3x3 ×2",
                 "2/3", "480 (480) nonzero parameters vs target 500"):
        assert text in out, out
    for name in ("thresholds.png", "params.png", "retention_by_cell.png"):
        _assert_png(run / "report" / name)

    result = json.loads((run / "report" / "report.json").read_text())
    assert result["grouped_by"] == "cell"
    cells = {g["name"]: g for g in result["groups"]}
    assert cells["cells.0"]["op_types"] == {"sep_conv_3x3": [1, 1], "skip_connect": [0, 1], "max_pool_3x3": [1, 1]}
    assert cells["cells.0"]["filter_retention"] == (6 + 4) / 16  # the surviving layers' channels
    assert cells["cells.0"]["weight_retention"] == (24 + 24) / (48 + 24)
    assert cells["cells.1"]["weight_retention"] == 8 / 32 and cells["cells.1"]["filter_retention"] == 1.0
    assert cells["cells.2"]["params"] == 16 + 2 and cells["classifier"]["params"] == 20

    groups, _ = group_arch(json.loads((run / "arch.json").read_text()), {})
    assert all(g.params is None and g.weight_retention is None for g in groups)
    ax = plot_retention(groups).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["skip_connect", "sep_conv_3x3", "max_pool_3x3",
                                                            "filters", "weights"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cell 0", "cell 1", "cell 2"]
    values = np.ma.filled(ax.images[0].get_array(), np.nan)
    _same(list(values[0]), [0.0, 1.0, 1.0, 10 / 16, math.nan])
    _same(list(values[2]), [math.nan, 1.0, math.nan, 2 / 8, math.nan])

    rows = load_metrics(run)
    ax = plot_params(rows).axes[0]
    assert [t.get_text() for t in ax.texts] == ["+1 ops regrown", "stage 1 ends"]
    lines = _lines(ax)
    _same(lines["stage parameters"], [400, 200, math.nan])
    _same(lines["stage goal"], [200, 200, math.nan])
    thresholds, _ = _threshold_and_retention_lines(plot_thresholds(rows))
    assert set(thresholds) == {"op (α)", "filter (β)"}  # no row records ω


def test_without_the_model_the_weight_and_parameter_columns_are_empty(tmp_path, capsys):
    run = _darts_run(tmp_path)
    shutil.rmtree(run / "model")
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "no model/model.safetensors" in err and "granular export" in err
    result = json.loads((run / "report" / "report.json").read_text())
    assert result["missing"] == ["model/model.safetensors"]
    assert all(g["params"] is None and g["weight_retention"] is None for g in result["groups"])
    assert [g["ops_kept"] for g in result["groups"] if g["name"].startswith("cells.")] == [2, 1, 2]


def test_a_cut_short_last_line_is_dropped(tmp_path):
    run = _darts_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "par')
    assert [r["epoch"] for r in load_metrics(run)] == [1, 2, 3]


def test_a_failed_write_keeps_the_previous_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run = _darts_run(tmp_path)
    report(run)
    good = (run / "report" / "thresholds.png").read_bytes()

    def boom(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", boom)
    code = main(["report", str(run)])
    assert (run / "report" / "thresholds.png").read_bytes() == good
    assert not list((run / "report").glob("*.tmp"))
    assert code == 2


@pytest.mark.parametrize("case, needles", [
    ("missing", ("does not exist", "run directory")),
    ("file", ("is a file", "run directory")),
    ("empty_dir", ("no metrics.jsonl", "granular search")),
    ("no_epoch_yet", ("no metrics.jsonl", "not finished an epoch")),
    ("empty_log", ("is empty", "not finished an epoch")),
    ("damaged_log", ("line 1 is not a metrics row", "delete that line", "--resume")),
    ("bad_arch", ("arch.json is corrupt", "delete it")),
])
def test_bad_run_directories_get_one_line(tmp_path, capsys, case, needles):
    run = tmp_path / "run"
    if case == "file":
        run.write_text("")
    elif case != "missing":
        run.mkdir()
    if case in ("no_epoch_yet", "empty_log", "damaged_log", "bad_arch"):
        (run / "config.json").write_text("{}")
    if case == "empty_log":
        (run / "metrics.jsonl").write_text("\n")
    if case == "damaged_log":
        (run / "metrics.jsonl").write_text('{"epoch": \n{"epoch": 2}\n')
    if case == "bad_arch":
        (run / "metrics.jsonl").write_text('{"epoch": 1, "params": 10}\n')
        (run / "arch.json").write_text("{")
    code = main(["report", str(run)])
    assert_one_line_error(code, capsys.readouterr().err, *needles)
