"""`import granular` stays light: no triton, no CUDA initialisation (docs/design.md, "Layers")."""

import subprocess
import sys


def test_import_does_not_touch_triton_or_cuda():
    code = ("import sys, torch, granular; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
            "print(sorted(granular.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'count_params'" in out.stdout and "'testing'" in out.stdout
