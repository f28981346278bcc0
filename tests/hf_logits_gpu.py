"""Writes a random ~1B-shaped HF Llama (bf16) and its logits on GPU; run in its own process (torch and JAX would
both claim GPU memory). Used by tests/test_gpu_parity.py: python hf_logits_gpu.py CONFIG_DIR OUT_DIR.

The logits come from the saved checkpoint loaded as users load it (`from_pretrained(dtype=...)`), not from the
freshly built model cast with `.to(torch.bfloat16)`: that cast also rounds the rotary embedding's float32 inv_freq
buffer to bf16, which HF's own loading keeps in float32, and shifts every rotation angle by up to 0.4% (measured on
CPU: jpaged float32 vs that model in float32 differs by 5e-3, vs the loaded checkpoint by 4e-6)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def main(config_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(**json.loads((Path(config_dir) / "config.json").read_text()))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: to check this script without a GPU
    with torch.device(device):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)  # bf16 weights
    shutil.copy(Path(config_dir) / "config.json", out / "config.json")
    prompts = [[1, *range(100, 163)], [1, *range(3000, 3017)]]
    # bf16 as served, then the same weights in float32: the truth both bf16 runs approximate, to tell rounding noise
    # from a bug. Then bf16 again with eager attention: another correct bf16 implementation, whose distance from the
    # first is the noise floor two correct bf16 runs of this random model have (on CPU: 2.4-2.7e-2, above the
    # issue's 2e-2; one run of HF on 1 thread vs 2 threads: 1.9e-2).
    runs = (
        (torch.bfloat16, "sdpa", "hf_logits.npz"),
        (torch.float32, "sdpa", "hf_logits_f32.npz"),
        (torch.bfloat16, "eager", "hf_logits_eager.npz"),
    )
    for dtype, attn, name in runs:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, attn_implementation=attn).to(device).eval()
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
        with torch.no_grad():
            logits = [model(torch.tensor([p], device=device)).logits[0].float().cpu().numpy() for p in prompts]
        np.savez(out / name, *logits)
        del model
    (out / "prompts.json").write_text(json.dumps(prompts))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
