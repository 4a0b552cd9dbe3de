"""matplotlib for the benchmark scripts: headless (Agg), and optional (``pip install ".[bench]"``)."""

from __future__ import annotations


def pyplot(hint: str = ""):
    """``matplotlib.pyplot`` with the Agg backend, or None (after saying so) where it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot{hint}")
        return None
    return plt
