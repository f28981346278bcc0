"""Runs another benchmark script with the Mosaic GPU decode kernel's default tuning changed, for engine A/Bs of a
tuning against the default.

    python benchmarks/with_decode_tuning.py 'ppb=4' benchmarks/throughput.py --engine jpaged \
        --model llama2-7b --run fixed:128 --max-model-len 2048          # q rows on M, as before positions on M
    python benchmarks/with_decode_tuning.py 'preg=1' benchmarks/latency.py --model llama2-7b --no-warmup

The first argument names DecodeTuning fields as `mgpu_decode.py --tunings` does (one tuning, no ';'); every batch the
engine runs through the kernel gets a `DecodeTuning` of those fields, the split count `default_tuning(B, N, K)` picks
unless `splits=` is given, and DecodeTuning's defaults for the rest (q rows on M, the warpgroup lowering: not the
default tuning's formulation, which at G = 1 is positions on M and would exclude e.g. `preg=1`). Where the changed
tuning cannot run a batch's shapes, `paged_attention`'s "auto" dispatch asks `decode_unsupported_reason` (which calls
the replaced function) and runs that batch on the Triton kernel, as it would for any unsupported shape. The rest of the
command line is the script and its arguments, run as `python <script> <args>` would run it; the override is exported
(common.DECODE_TUNING_ENV), so every record the script writes says it in `env`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/with_decode_tuning.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)

USAGE = "usage: with_decode_tuning.py FIELDS SCRIPT [ARGS...]  (FIELDS as in mgpu_decode.py --tunings: posm=1,sem=lane)"


def override_fields(text: str) -> dict[str, Any]:
    """'posm=1,sem=lane' -> the DecodeTuning fields it names, checked by building a tuning of them."""
    from benchmarks.mgpu_decode import parse_tuning_fields
    from jpaged.kernels.paged_decode_mgpu import DecodeTuning

    if ";" in text:
        raise ValueError(f"one tuning expected (no ';'), got {text!r}")
    fields = parse_tuning_fields(text)
    DecodeTuning(**fields)
    return fields


def install(fields: dict[str, Any]) -> None:
    """Replaces `paged_decode_mgpu.default_tuning` (which the decode entry point calls at trace time)."""
    from jpaged.kernels import paged_decode_mgpu
    from jpaged.kernels.paged_decode_mgpu import DecodeTuning

    default = paged_decode_mgpu.default_tuning

    def tuned(num_seqs: int, num_heads: int, num_kv_heads: int) -> Any:
        return DecodeTuning(**({"num_splits": default(num_seqs, num_heads, num_kv_heads).num_splits} | fields))

    paged_decode_mgpu.default_tuning = tuned


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        raise SystemExit(USAGE)
    fields = override_fields(argv[0])
    install(fields)
    os.environ[common.DECODE_TUNING_ENV] = argv[0]
    print(f"with_decode_tuning: the decode kernel's default tuning with {fields}", flush=True)
    common.run_script(argv[1:])


if __name__ == "__main__":
    main()
