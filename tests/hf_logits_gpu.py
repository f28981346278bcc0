"""Writes a random ~1B-shaped HF Llama (bf16) and its logits on GPU; run in its own process (torch and JAX would
both claim GPU memory). Used by tests/test_gpu_parity.py: python hf_logits_gpu.py CONFIG_DIR OUT_DIR."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(config_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(**json.loads((Path(config_dir) / "config.json").read_text()))
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(Path(config_dir) / "config.json", out / "config.json")
    prompts = [[1, *range(100, 163)], [1, *range(3000, 3017)]]
    logits = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            logits.append(model(ids).logits[0].float().cpu().numpy())
    np.savez(out / "hf_logits.npz", *logits)
    # The same weights in float32: the truth both bf16 runs approximate, to tell rounding noise from a bug.
    model = model.float()
    with torch.no_grad():
        exact = [model(torch.tensor([p], device="cuda")).logits[0].cpu().numpy() for p in prompts]
    np.savez(out / "hf_logits_f32.npz", *exact)
    (out / "prompts.json").write_text(json.dumps(prompts))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
