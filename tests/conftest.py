"""Test configuration shared by the whole suite."""

import os

# On 2 cores, OpenMP threads that spin-wait make every small op ~100x slower whenever
# another process holds a core; passive waiting avoids that. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
