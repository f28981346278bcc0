"""What the default backend can run, and the shape rule every Triton-lowered kernel shares: the kernels' one place for
them."""

from __future__ import annotations

import jax


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


# Streaming multiprocessors of an H200 (and an H100 SXM): a grid of fewer programs leaves some idle.
H200_SMS = 132


def is_power_of_two(n: int) -> bool:
    """Triton's blocks have power-of-two sides; so do most of the kernels' tuning knobs."""
    return n >= 1 and (n & (n - 1)) == 0


def on_hopper() -> bool:
    """The Mosaic GPU kernels need sm_90 (wgmma, TMA)."""
    return on_gpu() and getattr(jax.devices()[0], "compute_capability", "") == "9.0"
