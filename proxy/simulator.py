"""The simulator (``trio-run proxy.simulator``): Polygon's protocol with synthetic data and faults.

The code lives in :mod:`proxy.sim`; this module is the entry point that
deployment files and ``trio-run`` name.
"""

from __future__ import annotations

from .sim.simulator import main

__all__ = ["main"]

if __name__ == "__main__":
    from .app.cli import run_module_main
    raise SystemExit(run_module_main(main))
