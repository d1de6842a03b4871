"""Small formatting helpers for messages and tables."""

from __future__ import annotations

__all__ = ["fmt_count", "fmt_pct"]


def fmt_count(n: float) -> str:
    """``1234567`` -> ``1.23M``; ``12345`` -> ``12.3K``; small numbers stay whole."""
    n = float(n)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{int(n)}"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
