"""Attention heads across the zoos: how many attention layers have head units, and what that
adds to the prunable share of each transformer family.

For every model given (default: the smallest model of each timm family, and torchvision's
attention models), with a 10-class head:

1. count the attention cores in the traced graph (``scaled_dot_product_attention`` nodes and
   ``softmax(q kᵀ) v`` written out) and those ``find_heads`` turns into head units;
2. the share of the parameters that filter-level pruning alone can remove (every filter gate,
   and head gate, at zero but one, as protection keeps; no op or weight pruning), without
   and with head gates (``GateConfig(head_gates=False)`` against the default). Weight masks
   reach nearly every layer either way, so ``granular inspect``'s prunable share hardly moves;
   this is the structured part, what shrinks the layers themselves;
3. exactness with the heads pruned: random masks (``check_export``, mask seeds 0 and 1, heads
   included) and, on top, every other head of every unit at zero: the compact output equals
   the gated one to 1e-4 relative, and the compact model holds fewer heads.

Models with no attention core are skipped (listed at the end).

    python benchmarks/heads.py                                   # every timm family (an hour on 2 cores)
    python benchmarks/heads.py --models timm:vit_tiny_patch16_224 timm:swin_tiny_patch4_window7_224
    python benchmarks/heads.py --markdown /tmp/heads.md
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402
from zoo import _time_limit, smallest_per_family  # noqa: E402

import granular  # noqa: E402
from granular.config import GateConfig  # noqa: E402
from granular.meta import HEADS  # noqa: E402
from granular.passes._attention import find_core  # noqa: E402
from granular.passes.trace import trace  # noqa: E402
from granular.spec import build_zoo_model, default_input  # noqa: E402
from granular.testing import check_export, random_masks_  # noqa: E402

TORCHVISION = ("vit_b_16", "swin_t", "swin_v2_t", "maxvit_t")


def _zero_every_other_head(gm) -> int:
    """Every other head of every head unit at zero (each keeps its first); other gates open.
    Returns the heads left."""
    left = 0
    for n in gm.graph.nodes:
        if HEADS in n.meta and n.op == "call_module":
            mask = gm.get_submodule(str(n.target)).mask
            mask.copy_((torch.arange(mask.numel()) % 2 == 0).float())
            left += int(mask.sum())
    return left


def filter_level_share(model, x, config: GateConfig) -> float:
    """1 - count / dense with every filter-level gate at zero but its first unit."""
    gm = granular.prepare(model, x, config, auto_leaf=True)
    random_masks_(gm, op=0.0, filter=0.0, weight=0.0, seed=0)
    dense = granular.count_params(gm).total
    for gate in gm.granular_gates.filter.values():
        gate.mask.zero_()
        gate.mask[0] = 1.0
    return 1.0 - granular.count_params(gm).total / dense


def run_one(spec: str, timeout: int) -> dict:
    row = {"spec": spec, "cores": 0, "units": 0, "heads": 0, "before": float("nan"), "after": float("nan"),
           "exact": "", "kept": "", "reason": ""}
    try:
        with _time_limit(timeout):
            model = build_zoo_model(spec, num_classes=10).eval()
            x = default_input(spec, model, batch=2)
            traced = trace(model, x[:1], auto_leaf=True)
            modules = dict(traced.named_modules())
            row["cores"] = sum(find_core(n, modules) is not None for n in traced.graph.nodes)
            if not row["cores"]:
                return row
            gm = granular.prepare(model, x[:1], auto_leaf=True)
            units = [n.meta[HEADS] for n in gm.graph.nodes if HEADS in n.meta and n.op == "call_module"]
            row["units"], row["heads"] = len(units), sum(u.heads for u in units)
            row["before"] = filter_level_share(model, x[:1], GateConfig(head_gates=False))
            row["after"] = filter_level_share(model, x[:1], GateConfig())
            checks = [check_export(model, x, seed=s, auto_leaf=True) for s in (0, 1)]
            errors = [c.rel_err for c in checks]
            if units:
                random_masks_(gm, op=0.0, filter=0.0, weight=0.0, seed=0)
                left = _zero_every_other_head(gm)
                gm.eval()
                with torch.no_grad():
                    want = gm(x)
                    compact = granular.export(gm)
                    got = compact(x)
                errors.append(float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
                count = granular.count_params(gm)
                if count.total != sum(p.numel() for p in compact.parameters()):
                    row["reason"] = "count_params differs from the export"
                row["kept"] = f"{left}/{row['heads']}"
            bad = [c.reason for c in checks if not c.ok and "not smaller" not in c.reason]
            row["exact"] = "yes" if max(errors) < 1e-4 and not bad else "no"
            row["error"] = max(errors)
            row["reason"] = row["reason"] or "; ".join(bad)
    except Exception as err:  # noqa: BLE001 - report and go on
        row["reason"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    finally:
        gc.collect()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="specs (timm:NAME / torchvision:NAME); default: every timm family "
                                               "and torchvision's attention models")
    p.add_argument("--timeout", type=int, default=900, help="seconds per model")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    header("heads")
    specs = args.models or [f"timm:{m}" for m in smallest_per_family().values()] + \
        [f"torchvision:{m}" for m in TORCHVISION]
    rows, skipped = [], []
    for spec in specs:
        t0 = time.perf_counter()
        row = run_one(spec, args.timeout)
        if not row["cores"]:
            skipped.append(spec)
            continue
        rows.append(row)
        print(f"{spec}: {row['units']}/{row['cores']} attention layers with head units, {row['heads']} heads; "
              f"filter-level share {row['before']:.1%} -> {row['after']:.1%}; exact {row['exact'] or '-'} "
              f"(heads kept {row['kept'] or '-'}) {row['reason']} [{time.perf_counter() - t0:.0f} s]", flush=True)
    with_units = [r for r in rows if r["units"]]
    summary = (f"{len(with_units)}/{len(rows)} models with attention have head units; "
               f"{sum(r['exact'] == 'yes' for r in with_units)}/{len(with_units)} of those export exactly "
               f"with heads removed; {len(skipped)} models without attention skipped")
    print(summary)
    if args.markdown:
        lines = [f"- {summary}", "", "| model | attention layers | with head units | heads | filter-level share without heads | "
                 "with heads | exact | heads kept | reason |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| `{r['spec']}` | {r['cores']} | {r['units']} | {r['heads']} | {r['before']:.1%} | "
                         f"{r['after']:.1%} | {r['exact'] or '-'} | {r['kept'] or '-'} | {r['reason']} |")
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0 if all(r["exact"] == "yes" for r in with_units) else 1


if __name__ == "__main__":
    raise SystemExit(main())
