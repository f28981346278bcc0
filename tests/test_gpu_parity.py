"""On a GPU: a random ~1B-shaped Llama in bf16 gives HF transformers' logits (relative error <= 2e-2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, one_prompt_metadata

pytestmark = pytest.mark.gpu


def test_llama_1b_logits_match_hf_in_bf16(tmp_path):
    pytest.importorskip("torch")
    model = tmp_path / "llama-1b"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "hf_logits_gpu.py"),
            str(REPO / "benchmarks/configs/llama-1b"),
            str(model),
        ],
        check=True,
        env=env,
        timeout=600,
    )
    import jax
    import jax.numpy as jnp

    from jpaged import LLM
    from jpaged.models import get_forward

    llm = LLM(str(model), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=256, num_pages=64)
    runner = llm.engine.runner
    forward = jax.jit(get_forward(llm.engine.model_config, attn_impl="pallas"))
    prompts = json.loads((model / "prompts.json").read_text())
    want_all = np.load(model / "hf_logits.npz")

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    checks = []
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        meta = one_prompt_metadata(n, llm.engine.config.page_size)
        with jax.set_mesh(runner.mesh):
            logits, runner.kv_pages = forward(
                runner.params, jnp.array(prompt, jnp.int32), jnp.arange(n, dtype=jnp.int32), runner.kv_pages, meta
            )
        got, want = np.asarray(logits, np.float32), want_all[f"arr_{i}"]
        exact = np.load(model / "hf_logits_f32.npz")[f"arr_{i}"]
        eager = np.load(model / "hf_logits_eager.npz")[f"arr_{i}"]  # HF bf16 again, eager attention
        print(f"prompt {i}: jpaged-bf16 vs HF-bf16 {rel(got, want):.3e}; vs HF-f32 {rel(got, exact):.3e}; "
              f"HF-bf16 vs HF-f32 {rel(want, exact):.3e}; noise floor: HF-bf16-eager vs HF-bf16 "
              f"{rel(eager, want):.3e} (eager vs HF-f32 {rel(eager, exact):.3e}; jpaged-bf16 vs HF-bf16-eager "
              f"{rel(got, eager):.3e})")  # fmt: skip
        checks.append((i, got, want, exact, eager))
    for i, got, want, exact, eager in checks:  # every prompt's figures printed first
        # jpaged's bf16 is at least as close to the float32 truth as HF's own bf16 (within 10%) ...
        assert rel(got, exact) <= 1.1 * rel(want, exact), f"prompt {i}: {rel(got, exact):.3e} from float32"
        # ... no further from HF's bf16 than HF's own two attention paths are from each other (the noise floor two
        # correct bf16 runs of this random model have: one early rounding flipped by summation order grows over the
        # layers; 2.4-2.7e-2 on CPU, 2.7e-2 on the H200) ...
        assert rel(got, want) <= 1.25 * rel(eager, want), f"prompt {i}: {rel(got, want):.3e} from HF bf16"
        # ... and within the bound of HF's bf16 (not met: the noise floor above is past it).
        assert rel(got, want) <= 2e-2, f"prompt {i}: relative error {rel(got, want):.3e}"
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
