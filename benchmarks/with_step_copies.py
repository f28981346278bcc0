"""Runs another benchmark script with the engine's jitted step compiled N times over, consecutive calls of one step
variant taking the copies in turn: an experiment on the device's idle time before each step, not an engine option.

    python benchmarks/with_step_copies.py 2 benchmarks/throughput.py --engine jpaged --model llama2-7b \
        --run fixed:128 --max-model-len 2048

Why: XLA runs a compiled step as a CUDA graph (a command buffer) and patches that graph in place whenever a call's
buffer addresses differ from the last call's, which they do every step (a fresh packed input, fresh outputs). The
H200 traces (docs/benchmarks.md, seventh and thirteenth sessions) show the device idle ~0.7 ms a decode step between
the step's host-to-device copy and its first kernel; one reading is that the driver orders an updated graph's upload
behind the previous launch of the same graph, which is the step still running. With two copies, each update lands on
a graph whose last launch is a step older. Each copy compiles on its own (jits of distinct callables share no
traces), so the warm-up runs N times over and takes about N times as long, and every variant runs once on each copy
before serving. The rest of the command line is the script and its arguments, run as `python <script> <args>` would
run it; the copy count is exported (common.STEP_COPIES_ENV), so every record the script writes says it in `env`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/with_step_copies.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)

USAGE = "usage: with_step_copies.py N SCRIPT [ARGS...]  (N >= 2 compiled copies of the engine's step)"


class AlternatingStep:
    """Stands in for `jpaged.runner._jitted_step`: N jits of the step, and each variant's calls go round them."""

    def __init__(self, copies: int) -> None:
        import jax

        from jpaged import runner

        self.jits = [
            jax.jit(functools.partial(runner._step), static_argnames=runner.STEP_STATIC_ARGNAMES,
                    donate_argnames=("kv_pages",))
            for _ in range(copies)
        ]  # fmt: skip
        self.calls = [0] * copies  # calls each copy served
        self._turns: dict[Hashable, int] = {}

    def lower(self, *args: Any, **statics: Any) -> _LoweredCopies:
        return _LoweredCopies([jit.lower(*args, **statics) for jit in self.jits])

    def __call__(self, *args: Any, **statics: Any) -> Any:
        key = tuple(sorted(statics.items()))  # the variant: its static arguments (all hashable, as jit needs)
        turn = self._turns.get(key, 0)
        self._turns[key] = turn + 1
        copy = turn % len(self.jits)
        self.calls[copy] += 1
        return self.jits[copy](*args, **statics)


class _LoweredCopies:
    def __init__(self, lowered: list[Any]) -> None:
        self._lowered = lowered

    def compile(self) -> None:
        for lowered in self._lowered:
            lowered.compile()


def install(copies: int) -> AlternatingStep:
    """Replaces the runner's jitted step, and runs the warm-up once per copy so that each copy of every variant it
    compiles has run before the first real step (a first call also records the CUDA graph)."""
    from jpaged import runner

    step = AlternatingStep(copies)
    runner._jitted_step = step  # type: ignore[assignment]
    warm_up = runner.ModelRunner.warm_up

    def warm_up_each_copy(self: runner.ModelRunner, workers: int | None = None) -> float:
        return sum(warm_up(self, workers) for _ in range(copies))

    runner.ModelRunner.warm_up = warm_up_each_copy  # type: ignore[method-assign]
    return step


def parse_copies(text: str) -> int:
    copies = int(text)
    if copies < 2:
        raise ValueError(f"N must be >= 2 copies (1 is the engine as it is), got {copies}")
    return copies


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        raise SystemExit(USAGE)
    copies = parse_copies(argv[0])
    install(copies)
    os.environ[common.STEP_COPIES_ENV] = str(copies)
    print(f"with_step_copies: the engine's step compiled {copies} times, each variant's calls taking turns", flush=True)
    common.run_script(argv[1:])


if __name__ == "__main__":
    main()
