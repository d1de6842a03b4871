"""Coverage of the passes across the model zoos: prepare, random masks, export, check.

For the smallest model of every timm family (``timm.list_modules()``) and every torchvision
classification model, this runs :func:`granular.testing.check_export`: random masks at all
three granularities, then (1) the compact output equals the gated output in eval mode to
1e-4 relative, (2) ``count_params`` equals the export, (3) the export is smaller than the
original, and (4) the export saved with ``granular.save`` loads back from its own source,
without the original class, and computes the same; its compact model is also written as ONNX and as
a ``torch.export`` program (``--formats``), run back, and compared. Every model is checked with three mask
seeds and two head sizes (1000 and 10 classes); it passes only if all six checks pass (one
seed with one head let a wrong export through: VOLO's, issue 16). It prints the pass fraction
per zoo, a per-model table and each failure's reason.

    python benchmarks/zoo.py                       # both zoos (six checks a model: several hours on 2 CPU cores)
    python benchmarks/zoo.py --zoo torchvision     # one zoo
    python benchmarks/zoo.py --models timm:resnet10t torchvision:alexnet
    python benchmarks/zoo.py --models timm:volo_d1_224 --seeds 0 1 --classes 10
    python benchmarks/zoo.py --markdown docs/coverage.md

Goals: at least 90% of timm families and 95% of torchvision classification models
pass every check; operation units are found in every family with residual blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

from granular.spec import build_zoo_model, default_input, list_zoo_models  # noqa: E402
from granular.testing import check_export  # noqa: E402

GOALS = {"timm": 0.90, "torchvision": 0.95}
SEEDS = (0, 1, 2)
CLASSES = (1000, 10)


@dataclass
class Row:
    spec: str
    family: str
    ok: bool
    reason: str
    rel_err: float = float("nan")
    original: int = 0
    exported: int = 0
    op_units: int = 0
    filters: int = 0
    heads: int = 0       # of the filters, attention heads (find_heads)
    seconds: float = 0.0
    kept_whole: str = ""
    formats: dict = None   # format -> "" (runs back equal) or why not; checked on the first check only
    checks: str = ""     # passed/run, over mask seeds x head sizes


FAMILIES_CACHE = Path(__file__).with_name("zoo_timm_families.json")


def smallest_per_family(refresh: bool = False) -> dict[str, str]:
    """The smallest model (by parameters, counted on the meta device) of each timm family.

    Ranking builds all ~1,400 timm models on the meta device (about 30 minutes on 2 cores),
    so the result is cached in ``zoo_timm_families.json`` for the installed timm version."""
    import json

    import timm
    if FAMILIES_CACHE.is_file() and not refresh:
        cached = json.loads(FAMILIES_CACHE.read_text())
        if cached.get("timm") == timm.__version__:
            return cached["families"]
    families = _rank_families()
    FAMILIES_CACHE.write_text(json.dumps({"timm": timm.__version__, "families": families}, indent=1) + "\n")
    return families


def _rank_families() -> dict[str, str]:
    import timm
    best: dict[str, tuple[int, str]] = {}
    for family in timm.list_modules():
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"):
                    n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:  # noqa: BLE001 - a model that cannot build on meta is skipped for ranking
                continue
            if family not in best or n < best[family][0]:
                best[family] = (n, name)
    missing = [f for f in timm.list_modules() if f not in best]
    for family in missing:  # nothing built on meta: take the first name, it will report its error
        names = timm.list_models(module=family)
        if names:
            best[family] = (0, names[0])
    return {family: name for family, (_, name) in sorted(best.items())}


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def handler(signum, frame):
        raise _Timeout(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_one(spec: str, family: str, timeout: int, auto_leaf: bool, seeds=SEEDS, classes=CLASSES,
            formats=()) -> Row:
    """Check ``spec`` with every mask seed and head size (``timeout`` seconds per check). The
    row's sizes are those of the last head size and first seed (10 classes by default); its
    error is the largest; its reason is the first failure's, naming the head and seed. The
    deployment ``formats`` are written and run back on the first check (head, seed) only."""
    t0 = time.perf_counter()
    row = Row(spec, family, True, "", formats={})
    passed = run = 0
    errors = []
    for n_classes, seed in [(c, s) for c in classes for s in seeds]:
        run += 1
        torch.manual_seed(0)
        res, reason = None, ""
        try:
            with _time_limit(timeout):
                model = build_zoo_model(spec, num_classes=n_classes)
                x = default_input(spec, model)
                res = check_export(model, x, auto_leaf=auto_leaf, reload=True, seed=seed,
                                   formats=formats if run == 1 else ())
        except Exception as err:  # noqa: BLE001 - building or a timeout: report and go on
            first = (str(err).strip().splitlines() or [""])[0][:300]
            reason = f"{type(err).__name__}: {first}"
        finally:
            gc.collect()
        if res is not None:
            reason = res.reason
            errors.append(res.rel_err)
            if seed == seeds[0]:
                row.original, row.exported = res.original, res.exported.total if res.exported else 0
                row.op_units, row.filters = res.units.get("op", 0), res.units.get("filter", 0)
                row.heads = res.units.get("head", 0)
                row.kept_whole = ", ".join(sorted(set(res.auto_leaves)))
            row.formats.update(res.formats)
        if res is not None and res.ok:
            passed += 1
        elif row.ok:
            row.ok, row.reason = False, f"{n_classes} classes, seed {seed}: {reason}"
        if run == 1 and (res is None or reason.startswith("prepare:")):
            break  # does not build, trace or prepare, or times out: the other checks would too
    row.rel_err = max(errors) if errors and not any(math.isnan(e) for e in errors) else math.nan
    row.checks = f"{passed}/{run}"
    row.seconds = time.perf_counter() - t0
    return row


def _fmt(row: Row, fmt: str) -> str:
    if not row.formats or fmt not in row.formats:
        return "-"
    return "yes" if not row.formats[fmt] else "no: " + row.formats[fmt].replace("|", "/")


def to_markdown(rows: list[Row], summary: list[str], command: str, seeds=SEEDS, classes=CLASSES) -> str:
    lines = ["# Coverage across the model zoos", "",
             "Produced by `" + command + "` (random weights, random masks at all three granularities",
             f"with mask seeds {', '.join(map(str, seeds))} and {' and '.join(map(str, classes))}-class heads;",
             "norms get random statistics). A model passes when, for every seed and head, the compact",
             "output equals the gated output in eval mode to 1e-4 relative, `count_params` equals the",
             "export, the export is smaller than the original, and the saved export reloads (without",
             "the original class) and computes the same. `checks` counts the passing (seed, head) pairs;",
             "the error is the largest over them; sizes are those of the last head with the first seed.",
             "`filters` counts every filter-level unit, `heads` the attention heads among them.",
             "`onnx` and `pt2`: the compact model of the first check written with `granular.save(format=...)`,",
             "run back (onnxruntime; `torch.export.load`) and equal to it to 1e-4 relative (`-`: not run).", ""]
    lines += [f"- {s}" for s in summary] + [""]
    lines += ["| model | family | pass | checks | rel. error | params | exported | op units | filters | heads | "
              "kept whole | onnx | pt2 | reason |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.spec}` | {r.family} | {'yes' if r.ok else 'no'} | {r.checks} | {r.rel_err:.1e} | "
                     f"{r.original:,} | {r.exported:,} | {r.op_units} | {r.filters:,} | {r.heads:,} | {r.kept_whole} | "
                     f"{_fmt(r, 'onnx')} | {_fmt(r, 'pt2')} | {r.reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _summary(rows: list[Row], formats) -> list[str]:
    """The pass fractions per zoo, per deployment format, and the op-unit and auto-leaf counts."""
    summary = []
    for zoo in ("timm", "torchvision"):
        zr = [r for r in rows if r.spec.startswith(zoo + ":")]
        if not zr:
            continue
        passed = sum(r.ok for r in zr)
        what = "families (smallest model of each)" if zoo == "timm" else "classification models"
        goal = GOALS[zoo]
        summary.append(f"{zoo}: {passed}/{len(zr)} {what} pass = {passed / len(zr):.1%} "
                       f"(goal {goal:.0%}: {'met' if passed / len(zr) >= goal else 'not met'})")
        leafed = [r for r in zr if r.kept_whole or "kept whole" in r.reason]
        ok = [r for r in zr if r.ok]
        for fmt in formats:
            bad = [r for r in ok if r.formats.get(fmt)]
            summary.append(f"{zoo}: {fmt}: {len(ok) - len(bad)}/{len(ok)} of the passing models export and run back "
                           f"equal" + (f"; failing: {', '.join(r.spec for r in bad)}" if bad else ""))
        summary.append(f"{zoo}: {sum(r.op_units > 0 for r in zr)}/{len(zr)} have operation units; "
                       f"{len(leafed)} needed a module kept whole (auto-leaf), {sum(r.ok for r in leafed)} of them pass")
    return summary


def _write_markdown(args, argv, rows: list[Row], summary: list[str]) -> None:
    command = "python benchmarks/zoo.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    Path(args.markdown).write_text(to_markdown(rows, summary, command.strip(), tuple(args.seeds),
                                               tuple(args.classes)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", choices=("timm", "torchvision", "both"), default="both")
    p.add_argument("--models", nargs="*", help="explicit specs (timm:NAME / torchvision:NAME) instead of a sweep")
    p.add_argument("--timeout", type=int, default=600, help="seconds per check (model, seed, head size)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="mask seeds (default: 0 1 2)")
    p.add_argument("--classes", type=int, nargs="+", default=list(CLASSES),
                   help="head sizes (default: 1000 10)")
    p.add_argument("--formats", nargs="*", default=["onnx", "pt2"], choices=("onnx", "pt2"),
                   help="deployment formats to write and run back on each model's first check (default: "
                        "onnx pt2; onnx needs granular[onnx]; none: --formats)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--strict", action="store_true",
                   help="no auto-leaf: a model whose submodule does not trace fails (default: keep it whole, "
                        "as `granular search --auto-leaf` does, and list it)")
    p.add_argument("--refresh-families", action="store_true", help="re-rank timm models (ignore the cache)")
    args = p.parse_args(argv)
    header("zoo coverage: prepare -> random masks -> export -> checks")
    from rich.console import Console
    from rich.table import Table
    console = Console()

    todo: list[tuple[str, str]] = []
    if args.models:
        todo = [(s, s.split(":", 1)[0]) for s in args.models]
    else:
        if args.zoo in ("timm", "both"):
            todo += [(f"timm:{name}", family) for family, name in smallest_per_family(args.refresh_families).items()]
        if args.zoo in ("torchvision", "both"):
            todo += [(f"torchvision:{name}", "torchvision") for name in list_zoo_models("torchvision")]
    rows = []
    for i, (spec, family) in enumerate(todo, 1):
        row = run_one(spec, family, args.timeout, auto_leaf=not args.strict, seeds=tuple(args.seeds),
                      classes=tuple(args.classes), formats=tuple(args.formats))
        rows.append(row)
        status = f"[green]pass[/] {row.checks}" if row.ok else f"[red]FAIL[/] {row.checks} {row.reason}"
        status += "".join(f", {f} {_fmt(row, f)}" for f in args.formats)
        console.print(f"[{i}/{len(todo)}] {spec} ({row.seconds:.1f} s): {status}", highlight=False)
        if args.markdown:  # rewritten after every model, so a long sweep that is cut short keeps its rows
            _write_markdown(args, argv, rows, _summary(rows, args.formats) + [f"partial: {i} of {len(todo)} models"])

    table = Table(title="per model")
    for col in ("model", "pass", "checks", "rel. err", "params", "exported", "op units", "filters", "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.spec, "yes" if r.ok else "no", r.checks, f"{r.rel_err:.1e}", f"{r.original:,}", f"{r.exported:,}",
                      str(r.op_units), f"{r.filters:,}", r.reason)
    console.print(table)
    summary = _summary(rows, args.formats)
    for s in summary:
        print(s)
    if args.markdown:
        _write_markdown(args, argv, rows, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
