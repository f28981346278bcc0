"""Loading parameters from a Hugging Face folder (or making random ones of the same shapes) onto the mesh.

Tensors are read one at a time with safetensors (memory-mapped), put into jpaged's layout on the host, cast, and
placed straight onto their devices with the sharding from jpaged/sharding.py, so a large checkpoint never needs a
second full copy in host memory.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from tqdm.auto import tqdm

from jpaged import sharding
from jpaged.models.config import ModelConfig

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight$")
_EXPERT_KEY = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])$")

# HF name inside a layer -> jpaged's name for it (pieces of a fused weight are put together by `_fuse`)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attn.q_proj": "wq",
    "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo",
    "mlp.gate_proj": "w_gate",
    "mlp.up_proj": "w_up",
    "mlp.down_proj": "w_down",
    "block_sparse_moe.gate": "router",
}
_EXPERT_NAMES = {"w1": "expert_gate", "w3": "expert_up", "w2": "expert_down"}
# Fused parameter -> the pieces it is made of, in order.
_FUSED = {
    "wqkv": ("wq", "wk", "wv"),
    "w_gate_up": ("w_gate", "w_up"),
    "expert_gate_up": ("expert_gate", "expert_up"),
}
_PART_OF = {part: fused for fused, parts in _FUSED.items() for part in parts}


def resolve_dtype(dtype: str, model_dir: Path | None) -> jnp.dtype:
    if dtype == "auto":
        hf = json.loads((model_dir / "config.json").read_text()) if model_dir else {}
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    names = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported (choose auto, float32, bfloat16 or float16)")
    return jnp.dtype(names[dtype])


def _to_jpaged_layout(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if name == "wq":
        return w.T.reshape(d, n, h)
    if name in ("wk", "wv"):
        return w.T.reshape(d, k, h)
    if name == "wo":
        return w.T.reshape(n, h, d)
    if name in ("w_gate", "w_up", "w_down", "router"):
        return w.T
    return w


def _replicate_kv_heads(name: str, w: np.ndarray, cfg: ModelConfig, tp: int) -> np.ndarray:
    repeats = sharding.kv_heads_per_pool(cfg.num_kv_heads, tp) // cfg.num_kv_heads
    return np.repeat(w, repeats, axis=1) if name in ("wk", "wv") and repeats > 1 else w


def _fuse(name: str, parts: list[np.ndarray]) -> np.ndarray:
    """Pieces (in jpaged's layout, KV heads already repeated) -> the fused parameter `name`."""
    if name == "wqkv":  # q [D, N, H], k and v [D, K, H] -> [D, K, G + 2, H]: each KV head's query heads, k, v
        q, k, v = parts
        d, kv_heads, h = k.shape
        return np.concatenate([q.reshape(d, kv_heads, -1, h), k[:, :, None], v[:, :, None]], axis=2)
    if name == "w_gate_up":  # [D, F] twice -> [D, 2, F]
        return np.stack(parts, axis=1)
    if name == "expert_gate_up":  # [E, D, F] twice -> [E, D, 2F]: one grouped matmul, split by columns
        return np.concatenate(parts, axis=2)
    raise AssertionError(name)


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in model folder {str(model_dir)!r}")
    return files


def _param_shapes(cfg: ModelConfig, tp: int) -> dict[str, Any]:
    d, n, h, f, v = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    k = sharding.kv_heads_per_pool(cfg.num_kv_heads, tp)
    layer: dict[str, tuple[int, ...]] = {
        "attn_norm": (d,), "wqkv": (d, k, n // k + 2, h), "wo": (n, h, d), "mlp_norm": (d,),
    }  # fmt: skip
    if cfg.is_moe:
        e = cfg.num_experts
        layer |= {"router": (d, e), "expert_gate_up": (e, d, 2 * f), "expert_down": (e, f, d)}
    else:
        layer |= {"w_gate_up": (d, 2, f), "w_down": (f, d)}
    shapes: dict[str, Any] = {
        "embed": (v, d),
        "final_norm": (d,),
        "layers": [dict(layer) for _ in range(cfg.num_layers)],
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (v, d)
    return shapes


def load_params(
    model_dir: str | Path, cfg: ModelConfig, mesh: Mesh, dtype: jnp.dtype, *, progress: bool | None = None
) -> dict[str, Any]:
    """Reads every tensor of the folder's safetensors files into jpaged's parameter pytree, sharded on `mesh`."""
    model_dir = Path(model_dir)
    tp = mesh.shape[sharding.TP]
    expected = _param_shapes(cfg, tp)
    shardings = sharding.param_shardings(
        jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), expected, is_leaf=lambda x: isinstance(x, tuple)),
        mesh,
    )
    files = _safetensors_files(model_dir)
    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else total > 1 << 30
    params: dict[str, Any] = {"layers": [{} for _ in range(cfg.num_layers)]}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = defaultdict(dict)
    pieces: dict[tuple[int, str], dict[str, np.ndarray]] = defaultdict(dict)  # (layer, fused name) -> parts so far

    def place(i: int, name: str, w: np.ndarray) -> None:
        """Puts a layer's parameter on its devices, or holds a piece of a fused one until the rest arrives."""
        if (fused := _PART_OF.get(name)) is not None:
            have = pieces[(i, fused)]
            have[name] = w
            if len(have) < len(_FUSED[fused]):
                return
            name, w = fused, _fuse(fused, [have[part] for part in _FUSED[fused]])
            del pieces[(i, fused)]
        params["layers"][i][name] = jax.device_put(w.astype(dtype), shardings["layers"][i][name])

    with tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", disable=not show) as bar:
        for file in files:
            with safe_open(file, framework="np") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    w = f.get_tensor(key)
                    bar.update(w.nbytes)
                    if key == "model.embed_tokens.weight":
                        params["embed"] = jax.device_put(w.astype(dtype), shardings["embed"])
                    elif key == "model.norm.weight":
                        params["final_norm"] = jax.device_put(w.astype(dtype), shardings["final_norm"])
                    elif key == "lm_head.weight":
                        if not cfg.tie_word_embeddings:
                            params["lm_head"] = jax.device_put(w.astype(dtype), shardings["lm_head"])
                    elif m := _LAYER_KEY.match(key):
                        i, rest = int(m.group(1)), m.group(2)
                        if i >= cfg.num_layers:
                            raise ValueError(f"{file.name}: tensor {key} is past num_hidden_layers={cfg.num_layers}")
                        if e := _EXPERT_KEY.match(rest):
                            experts[(i, _EXPERT_NAMES[e.group(2)])][int(e.group(1))] = w.T
                            continue
                        name = _LAYER_NAMES.get(rest)
                        if name is None:
                            continue  # e.g. rotary_emb.inv_freq in old checkpoints: recomputed, not loaded
                        place(i, name, _replicate_kv_heads(name, _to_jpaged_layout(name, w, cfg), cfg, tp))
    for (i, name), by_expert in experts.items():
        if sorted(by_expert) != list(range(cfg.num_experts)):
            raise ValueError(
                f"layer {i}: expected experts 0..{cfg.num_experts - 1} for {name}, found {sorted(by_expert)}"
            )
        place(i, name, np.stack([by_expert[e] for e in range(cfg.num_experts)]))
    if pieces:  # fused parameters some of whose pieces never came
        missing = [f"layers.{i}.{part}" for (i, fused), have in sorted(pieces.items()) for part in _FUSED[fused]
                   if part not in have]  # fmt: skip
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks tensors for: {', '.join(missing[:8])}")
    _check_complete(params, expected, model_dir)
    return params


def _check_complete(params: dict[str, Any], expected: dict[str, Any], model_dir: Path) -> None:
    missing: list[str] = []
    for name in ("embed", "final_norm", "lm_head"):
        if name in expected and name not in params:
            missing.append(name)
    for i, layer in enumerate(expected["layers"]):
        for name, shape in layer.items():
            got = params["layers"][i].get(name)
            if got is None:
                missing.append(f"layers.{i}.{name}")
            elif got.shape != shape:
                raise ValueError(f"{model_dir}: layers.{i}.{name} has shape {got.shape}, config implies {shape}")
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks tensors for: {', '.join(missing[:8])}")
    for name in ("embed", "final_norm", "lm_head"):
        if name in params and params[name].shape != expected[name]:
            raise ValueError(f"{model_dir}: {name} has shape {params[name].shape}, config implies {expected[name]}")


def dummy_params(cfg: ModelConfig, mesh: Mesh, dtype: jnp.dtype, *, seed: int = 0) -> dict[str, Any]:
    """Random parameters of the config's shapes, made on the devices (no host copy): for benchmarks."""
    tp = mesh.shape[sharding.TP]
    shapes = _param_shapes(cfg, tp)
    structs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    shardings = sharding.param_shardings(structs, mesh)
    leaves, treedef = jax.tree.flatten(structs)
    keys = list(jax.random.split(jax.random.key(seed), len(leaves)))

    def make(key: jax.Array, struct: jax.ShapeDtypeStruct) -> jax.Array:
        if len(struct.shape) == 1:  # norms: ones keep activations in range
            return jnp.ones(struct.shape, struct.dtype)
        return (0.02 * jax.random.normal(key, struct.shape, jnp.float32)).astype(struct.dtype)

    out = [
        jax.jit(make, static_argnames=("struct",), out_shardings=s)(k, struct=st)
        for k, st, s in zip(keys, leaves, jax.tree.leaves(shardings), strict=True)
    ]
    return jax.tree.unflatten(treedef, out)
