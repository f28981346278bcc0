"""The residual add and the RMSNorm after it, in one kernel.

T tokens, D model width.

Contract: residual = x + delta (in x's dtype); normed = weight * rms_norm(residual), where rms_norm normalises in
float32 and rounds to x's dtype before the scale, as HF's LlamaRMSNorm does (`rms_norm`, the reference and the XLA
path). Both come back; the next layer adds to `residual` and reads `normed`.

Why. A Llama layer adds a residual and normalises twice. XLA emits each pair as three launches (the add; the sum of
squares, a row reduction; the scale, which reads the row again), each moving a few KB a token: at one token a launch
costs ~1.5-3 us whatever it moves. Here one program owns one token's whole row: it reads x and delta once, keeps the
sum in registers for the reduction and the scale, and writes both outputs.

Measured (H200, Llama-2-7B, docs/benchmarks.md, ninth session): 2.1 us a call at batch 1, 2.5 at 128; single-stream
decode 241.4 against 240.1 tok/s with XLA's fusions in the same call. Less than the launch count promised: XLA had
fused the add into the split-K reduction of the output and down projections' GEMMs, which now runs alone.

Design. Grid (T,), one program a row; the row is one block ([D]: Triton's blocks have power-of-two sides, so D must
be one; Llama-2-13B's 5120 is not and stays with XLA). The tuning is the warps a program spreads its row over.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.kernels.paged_attention import pallas_out_struct
from jpaged.kernels.platform import is_power_of_two, on_gpu

IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AddRmsNormTuning:
    """One kernel, one knob: the warps that share a program's row (a power of two, 1-32)."""

    num_warps: int = 4

    def __post_init__(self) -> None:
        n = self.num_warps
        if not isinstance(n, int) or isinstance(n, bool) or n > 32 or not is_power_of_two(n):
            raise ValueError(f"AddRmsNormTuning.num_warps must be a power of two in [1, 32], got {n!r}")


def default_tuning(width: int) -> AddRmsNormTuning:
    """A warp per 512 elements of the row, 1-8 warps (4096 wide: 8 warps, 16 bf16 elements a thread). Not swept on a
    GPU: at ~2.1 us a call the kernel is at a launch's cost."""
    return AddRmsNormTuning(num_warps=min(8, max(1, width // 512)))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., D] -> weight * x / rms(x): normalised in float32, rounded to x's dtype, then scaled (as HF)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def add_rms_norm_reference(x: jax.Array, delta: jax.Array, weight: jax.Array, eps: float):
    """Plain jnp (and the XLA path): (x + delta, rms_norm(x + delta))."""
    residual = x + delta
    return residual, rms_norm(residual, weight, eps)


def _validate(x, delta, weight) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}")
    if delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(f"delta {delta.shape} {delta.dtype} must match x {x.shape} {x.dtype}")
    if weight.shape != x.shape[1:]:
        raise ValueError(f"weight must be [D={x.shape[1]}], got shape {weight.shape}")


def pallas_unsupported_reason(x: jax.Array) -> str | None:
    """Why the compiled kernel cannot take rows of this width, or None."""
    width = x.shape[-1]
    if not is_power_of_two(width):
        return f"D = {width} is not a power of two (a Triton block's side)"
    return None


def _kernel(
    x_ref,  # [D] this program's row of the residual stream
    delta_ref,  # [D] what the layer adds to it
    weight_ref,  # [D] the norm's scale
    residual_ref,  # [D] out: x + delta, in x's dtype
    normed_ref,  # [D] out: weight * rms_norm(residual)
    *,
    eps: float,
):
    # Each op in float32, its result rounded to its output's dtype: HF's eager ops, and `rms_norm` op by op. (XLA may
    # drop an intermediate rounding inside a fusion: on CPU the jitted reference normalises the unrounded sum.)
    f32 = jnp.float32
    residual = (x_ref[...].astype(f32) + delta_ref[...].astype(f32)).astype(residual_ref.dtype)
    residual_ref[...] = residual
    xf = residual.astype(f32)
    normalised = (xf * jax.lax.rsqrt(jnp.mean(xf * xf) + eps)).astype(residual_ref.dtype)
    normed_ref[...] = (weight_ref[...].astype(f32) * normalised.astype(f32)).astype(normed_ref.dtype)


def _add_rms_norm_pallas(x, delta, weight, *, eps, tuning: AddRmsNormTuning, interpret: bool):
    num_tokens, width = x.shape
    row = pl.BlockSpec((None, width), lambda t: (t, 0))
    normed_dtype = jnp.result_type(weight.dtype, x.dtype)
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(num_tokens,),
        in_specs=[row, row, pl.BlockSpec((width,), lambda t: (0,))],
        out_specs=[row, row],
        out_shape=[
            pallas_out_struct(x.shape, x.dtype, x, delta, weight),
            pallas_out_struct(x.shape, normed_dtype, x, delta, weight),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(x, delta, weight)


def resolve_impl(impl: str, x: jax.Array) -> str:
    """What "auto" means for rows like x on the default backend: the kernel on a GPU where D is a power of two,
    else XLA's fusions."""
    if impl != "auto":
        return impl
    return "pallas" if on_gpu() and pallas_unsupported_reason(x) is None else "xla"


@functools.partial(jax.jit, static_argnames=("eps", "impl", "tuning", "interpret"))
def add_rms_norm(
    x: jax.Array,  # [T, D]
    delta: jax.Array,  # [T, D] x's dtype
    weight: jax.Array,  # [D]
    *,
    eps: float,
    impl: str = "auto",
    tuning: AddRmsNormTuning | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # residual [T, D] in x's dtype, normed [T, D]
    """(x + delta, weight * rms_norm(x + delta)) for every row.

    impl: "xla" (jnp; any backend), "pallas" (one Triton-style program a row; on a GPU D must be a power of two; off
    GPU it needs interpret=True) or "auto" (`resolve_impl`). tuning: None picks `default_tuning(D)`.
    """
    _validate(x, delta, weight)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    impl = resolve_impl(impl, x)
    if impl == "xla":
        return add_rms_norm_reference(x, delta, weight, eps)
    if not interpret and not on_gpu():
        raise ValueError(f"impl='pallas' needs a GPU (backend is {jax.default_backend()!r}) or interpret=True")
    if not interpret and (reason := pallas_unsupported_reason(x)) is not None:
        raise ValueError(f"impl='pallas' cannot normalise these rows: {reason}")
    return _add_rms_norm_pallas(x, delta, weight, eps=eps, tuning=tuning or default_tuning(x.shape[1]),
                                interpret=interpret)  # fmt: skip
