"""What the default backend can run: the kernels' one place for it."""

from __future__ import annotations

import jax


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def on_hopper() -> bool:
    """The Mosaic GPU kernels need sm_90 (wgmma, TMA)."""
    return on_gpu() and getattr(jax.devices()[0], "compute_capability", "") == "9.0"
