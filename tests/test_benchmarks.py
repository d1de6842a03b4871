"""The kernel benchmark is ready for a GPU: it runs end to end under triton's interpreter."""

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
