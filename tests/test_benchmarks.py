"""Benchmarks that must keep running: the kernel benchmark under triton's interpreter (ready
for a GPU), and the head-to-head against the peers at a tiny scale."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kernel_benchmark_runs_under_the_interpreter(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--tiny", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "## goals" in res.stdout and "super-net training step" in res.stdout
    import json
    rows = json.loads(out.read_text())
    assert rows["interpreter"] and len(rows["layers"]) == 6 and len(rows["steps"]) == 2
    assert max(r["err"] for r in rows["layers"]) < 1e-5


@pytest.mark.slow
def test_versus_benchmark_runs_end_to_end_and_every_method_ends_under_its_target(tmp_path):
    pytest.importorskip("torch_pruning", reason="the optional Torch-Pruning extra: pip install -e '.[bench]'")
    from granular.errors import DataError
    from granular.fashion_mnist import find_dir
    try:
        find_dir()
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "versus"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "versus.py"), "--subset", "300",
                          "--dense-epochs", "1", "--budget", "2", "--search-epochs", "2", "--targets", "0.3",
                          "--seeds", "0", "--out", str(out)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    import json
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == sorted(["granular", "granular-op-filter", "granular-filter",
                                                       "torch-pruning", "magnitude", "scaled"])
    assert all(0 < r["params"] <= r["target"] for r in rows)
    assert "| granular |" in res.stdout and "| torch-pruning |" in res.stdout
