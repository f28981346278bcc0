"""KV-cache write: the written slots hold the new K/V, every other slot is untouched, and the pages update
in place.

T tokens, K kv-heads, H head dim, P pages, S page size.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lower_for_h200
from jax.sharding import PartitionSpec as PS

from jpaged.kernels.kv_write import write_kv, write_kv_reference

# jax 0.11.2 warns on every Triton lowering of a Pallas kernel; that backend is what this kernel is written for.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

IMPLS = [("xla", False), ("pallas", True)]  # (impl, interpret); the pallas case runs compiled on a GPU


def interpret_here(interpret: bool) -> bool:
    return interpret and jax.default_backend() != "gpu"


def make_write(rng, *, num_kv_heads=2, page_size=8, head_dim=8, num_pages=12, num_pad_tokens=3,
               dtype=np.float32):  # fmt: skip
    """Tokens of three sequences written into randomly permuted pages, then padding tokens aimed at page 0."""
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k_pages = rng.standard_normal(shape).astype(dtype)
    v_pages = rng.standard_normal(shape).astype(dtype)
    free_pages = list(rng.permutation(np.arange(1, num_pages)))
    slots = []
    # (kv length before this step, new tokens): across a page boundary, from a page start, one decode token.
    for ctx, n in ((page_size - 2, 5), (0, page_size + 1), (3 * page_size - 1, 1)):
        pages = [free_pages.pop() for _ in range(-(-(ctx + n) // page_size))]
        slots += [pages[p // page_size] * page_size + p % page_size for p in range(ctx, ctx + n)]
    num_real = len(slots)
    slots += list(rng.integers(0, page_size, size=num_pad_tokens))  # padding: null-page slots, maybe repeated
    num_tokens = len(slots)
    k_new = rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(dtype)
    v_new = rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(dtype)
    return k_pages, v_pages, k_new, v_new, np.array(slots, np.int32), num_real


def expected_pages(pages, new, slots, num_real):
    num_kv_heads, num_pages, page_size, head_dim = pages.shape
    flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim).copy()
    flat[:, slots[:num_real]] = new[:num_real].swapaxes(0, 1)
    return flat.reshape(pages.shape)


def check_written(out_pages, pages, new, slots, num_real):
    """Exact equality outside the null page; page 0 holds whatever a padding token wrote or what was there."""
    out_pages = np.asarray(out_pages)
    expected = expected_pages(pages, new, slots, num_real)
    np.testing.assert_array_equal(out_pages[:, 1:], expected[:, 1:])
    page_size = pages.shape[2]
    for offset in range(page_size):
        writers = [t for t in range(num_real, len(slots)) if slots[t] == offset]
        candidates = [pages[:, 0, offset]] if not writers else [new[t] for t in writers]
        assert any(np.array_equal(out_pages[:, 0, offset], c) for c in candidates), f"null page slot {offset}"


@pytest.mark.parametrize(("impl", "interpret"), IMPLS)
@pytest.mark.parametrize(("num_kv_heads", "page_size", "head_dim"), [(1, 8, 8), (2, 16, 16), (4, 32, 16)])
def test_write_kv(impl, interpret, num_kv_heads, page_size, head_dim):
    rng = np.random.default_rng(num_kv_heads * page_size)
    k_pages, v_pages, k_new, v_new, slots, num_real = make_write(
        rng, num_kv_heads=num_kv_heads, page_size=page_size, head_dim=head_dim
    )
    k_out, v_out = write_kv(*map(jnp.asarray, (k_pages, v_pages, k_new, v_new, slots)),
                            impl=impl, interpret=interpret_here(interpret))  # fmt: skip
    check_written(k_out, k_pages, k_new, slots, num_real)
    check_written(v_out, v_pages, v_new, slots, num_real)


@pytest.mark.parametrize(("impl", "interpret"), IMPLS)
def test_write_kv_bfloat16(impl, interpret):
    rng = np.random.default_rng(1)
    arrays = make_write(rng, page_size=16, head_dim=16, dtype=jnp.bfloat16)
    k_pages, v_pages, k_new, v_new, slots, num_real = arrays
    k_out, v_out = write_kv(*map(jnp.asarray, arrays[:5]), impl=impl, interpret=interpret_here(interpret))
    assert k_out.dtype == v_out.dtype == jnp.bfloat16
    check_written(k_out, k_pages, k_new, slots, num_real)
    check_written(v_out, v_pages, v_new, slots, num_real)


def test_reference():
    rng = np.random.default_rng(2)
    k_pages, v_pages, k_new, v_new, slots, num_real = make_write(rng)
    k_out, v_out = write_kv_reference(*map(jnp.asarray, (k_pages, v_pages, k_new, v_new, slots)))
    check_written(k_out, k_pages, k_new, slots, num_real)
    check_written(v_out, v_pages, v_new, slots, num_real)


@pytest.mark.parametrize(("impl", "interpret"), IMPLS)
def test_donated_pages_update_in_place(impl, interpret):
    """Donated pages must be reused: no "donated buffers were not usable" warning, the inputs are consumed."""
    rng = np.random.default_rng(3)
    k_pages, v_pages, k_new, v_new, slots, num_real = make_write(rng)
    step = jax.jit(write_kv, static_argnames=("impl", "interpret"), donate_argnames=("k_pages", "v_pages"))
    k_in, v_in = jnp.asarray(k_pages), jnp.asarray(v_pages)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Dd]onated buffers")
        k_out, v_out = step(k_in, v_in, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots),
                            impl=impl, interpret=interpret_here(interpret))  # fmt: skip
    assert k_in.is_deleted() and v_in.is_deleted()
    check_written(k_out, k_pages, k_new, slots, num_real)
    check_written(v_out, v_pages, v_new, slots, num_real)


@pytest.mark.parametrize(("impl", "interpret"), IMPLS)
def test_under_shard_map(impl, interpret):
    rng = np.random.default_rng(4)
    devices = jax.devices()
    k_pages, v_pages, k_new, v_new, slots, num_real = make_write(rng, num_kv_heads=len(devices))
    mesh = jax.sharding.Mesh(np.array(devices), ("model",))
    pages = PS("model", None, None, None)  # [K, P, S, H], K sharded
    new = PS(None, "model", None)  # [T, K, H], K sharded
    fn = jax.shard_map(
        lambda *args: write_kv(*args, impl=impl, interpret=interpret_here(interpret)),
        mesh=mesh,
        in_specs=(pages, pages, new, new, PS()),
        out_specs=(pages, pages),
        # The Pallas interpreter indexes the aliased (mesh-varying) pages with unvarying kernel values, which
        # jax 0.11.2's vma check rejects; compiled kernels are unaffected.
        check_vma=not (impl == "pallas" and interpret_here(interpret)),
    )
    k_out, v_out = jax.jit(fn)(*map(jnp.asarray, (k_pages, v_pages, k_new, v_new, slots)))
    check_written(k_out, k_pages, k_new, slots, num_real)
    check_written(v_out, v_pages, v_new, slots, num_real)


def _valid_args():
    arrays = make_write(np.random.default_rng(0))
    return dict(zip(("k_pages", "v_pages", "k_new", "v_new", "slot_mapping"), map(jnp.asarray, arrays[:5]),
                    strict=True))  # fmt: skip


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("k_pages", lambda a: a[0], r"k_pages must be \[K, P, S, H\]"),
        ("v_pages", lambda a: a[:, :-1], r"v_pages .* must match k_pages"),
        ("k_new", lambda a: a[:, :1], r"k_new must be \[T, K=2, H=8\]"),
        ("v_new", lambda a: a[:-1], r"v_new must have k_new's shape"),
        ("slot_mapping", lambda a: a[:-1], r"slot_mapping must be \[T=\d+\]"),
        ("slot_mapping", lambda a: a.astype(jnp.int16), r"slot_mapping must be int32"),
    ],
)
def test_validation_errors(name, bad, message):
    args = _valid_args()
    args[name] = bad(args[name])
    with pytest.raises(ValueError, match=message):
        write_kv(**args)


def test_bad_impl():
    with pytest.raises(ValueError, match=r"impl must be one of"):
        write_kv(**_valid_args(), impl="scatter")


def test_auto_picks_the_kernel_on_gpus_where_it_can_write_the_shape(monkeypatch):
    from jpaged.kernels import kv_write

    llama_7b, llama_13b = (jax.ShapeDtypeStruct((128, k, 128), jnp.bfloat16) for k in (32, 40))
    monkeypatch.setattr(kv_write, "on_gpu", lambda: False)
    assert kv_write.resolve_impl("auto", llama_7b) == "xla"
    monkeypatch.setattr(kv_write, "on_gpu", lambda: True)
    assert kv_write.resolve_impl("auto", llama_7b) == "pallas"
    assert kv_write.resolve_impl("auto", llama_13b) == "xla"  # 40 heads: no Triton block
    assert kv_write.resolve_impl("xla", llama_7b) == "xla" and kv_write.resolve_impl("pallas", llama_13b) == "pallas"


def test_auto_runs_the_kernel_where_it_resolves_to_it(monkeypatch):
    """ "auto" as a GPU would resolve it (the kernel interpreted here) writes every token, through the kernel."""
    from jpaged.kernels import kv_write

    calls = []
    kernel = kv_write._write_pallas
    monkeypatch.setattr(kv_write, "on_gpu", lambda: True)
    monkeypatch.setattr(kv_write, "_write_pallas", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    k_pages, v_pages, k_new, v_new, slots, num_real = make_write(np.random.default_rng(3), num_kv_heads=4)
    k_out, v_out = write_kv(*map(jnp.asarray, (k_pages, v_pages, k_new, v_new, slots)), interpret=True)
    assert calls == [{"interpret": True}]
    check_written(k_out, k_pages, k_new, slots, num_real)
    check_written(v_out, v_pages, v_new, slots, num_real)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU error")
def test_pallas_off_gpu_needs_interpret():
    with pytest.raises(ValueError, match=r"needs a GPU .* or interpret=True"):
        write_kv(**_valid_args(), impl="pallas")


def test_benchmark_checks_both_implementations(tmp_path):
    """benchmarks/kv_write.py on tiny shapes (Pallas interpreted off GPU): every row checked against the reference
    before it is timed, and written to JSON."""
    from benchmarks import kv_write

    out = tmp_path / "kv_write.json"
    record = kv_write.main(["--tiny", "--tokens", "3", "--iters", "1", "--json-out", str(out)])
    assert out.exists() and [row["impl"] for row in record["rows"]] == ["xla", "pallas"]
    for row in record["rows"]:
        assert row["ok"], row.get("error")
        assert row["bytes"] == 4 * 3 * 2 * 16 * 2 and row["time_us"] > 0


@pytest.mark.parametrize(("num_kv_heads", "num_pages"), [(32, 4096), (8, 4096), (1, 3001)])
def test_pallas_kernel_lowers_to_triton_for_an_h200(num_kv_heads, num_pages):
    """The compiled (not interpreted) kernel lowers for CUDA at Llama-2-7B's and Llama-3-8B's KV shapes and at one KV
    head a device (Llama-3-8B at tp=8) over a pool that is no power of two, 128 tokens, from any machine: Triton's
    lowering asks which GPU it compiles for, and an abstract H200 answers (the compile to PTX needs the GPU)."""
    from jpaged.kernels import kv_write

    pages = jax.ShapeDtypeStruct((num_kv_heads, num_pages, 16, 128), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((128, num_kv_heads, 128), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((128,), jnp.int32)
    kernel = functools.partial(kv_write._write_pallas, interpret=False)
    assert "triton" in lower_for_h200(kernel, pages, pages, new, new, slots)


def test_pallas_refuses_kv_heads_that_are_no_power_of_two():
    """Llama-2-13B's 40 KV heads: the compiled kernel's [K, H] block cannot be a Triton block, so it is refused with
    the reason (interpreted, it runs)."""
    from jpaged.kernels.kv_write import pallas_unsupported_reason

    new = jax.ShapeDtypeStruct((4, 40, 128), jnp.bfloat16)
    assert pallas_unsupported_reason(new) == "K (kv heads) = 40 is not a power of two"
    assert pallas_unsupported_reason(jax.ShapeDtypeStruct((4, 8, 128), jnp.bfloat16)) is None
