"""Runs another benchmark script with the residual's projections split into float32 partial sums that the add + norm
kernel adds (models/llama.py `H200_SPLIT_PARTIALS`), for engine A/Bs against XLA's split-K GEMM and its reduction.

    python benchmarks/with_split_partials.py '4096x4096x1=8,11008x4096x1=16' benchmarks/latency.py \
        --model llama2-7b --no-warmup                   # Llama-2-7B's output and down projections at one row

The first argument lists `KxNxM=S` entries: x [M, K] @ w [K, N] (the output projection is K = N = D, the down
projection K = F, N = D) at exactly M rows runs as S partial sums; an empty string runs the script with the table
emptied. It replaces the table, so shapes it does not list run as plain GEMMs. The rest of the command line is the
script and its arguments, run as `python <script> <args>` would run it; the table is exported
(common.SPLIT_PARTIALS_ENV), so every record the script writes says it in `env`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python benchmarks/with_split_partials.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)

USAGE = "usage: with_split_partials.py 'KxNxM=S,...' SCRIPT [ARGS...]"


def parse_table(text: str) -> dict[tuple[int, int, int], int]:
    """'4096x4096x1=8,11008x4096x1=16' -> {(4096, 4096, 1): 8, (11008, 4096, 1): 16}."""
    table: dict[tuple[int, int, int], int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            shape, splits = item.split("=")
            k, n, m = (int(v) for v in shape.split("x"))
            table[(k, n, m)] = int(splits)
        except ValueError as e:
            raise ValueError(f"bad entry {item!r}: expected KxNxM=S, e.g. 4096x4096x1=8") from e
        if k % table[(k, n, m)] or table[(k, n, m)] < 1:
            raise ValueError(f"bad entry {item!r}: S must divide K")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        raise SystemExit(USAGE)
    table = parse_table(argv[0])
    from jpaged.models import llama

    llama.H200_SPLIT_PARTIALS.clear()
    llama.H200_SPLIT_PARTIALS.update(table)
    os.environ[common.SPLIT_PARTIALS_ENV] = argv[0] or "none"
    print(f"with_split_partials: H200_SPLIT_PARTIALS = {table}", flush=True)
    common.run_script(argv[1:])


if __name__ == "__main__":
    main()
