"""Runs another benchmark script with each engine step's packed input staged in pinned host memory and copied to
the device by the step itself: an experiment on the device's idle time before each step, not an engine option.

    python benchmarks/with_pinned_input.py benchmarks/throughput.py --engine jpaged --model llama2-7b \
        --run fixed:128 --max-model-len 2048

Why: the engine passes each step's packed int32 buffer (jpaged/transfer.py) to the jitted step as a numpy array, so
the call copies it into a freshly allocated device buffer. H200 traces show the device idle ~0.8 ms a decode step
between that copy and the step's first kernel; one reading is that the runtime orders a copy into fresh device memory
behind the work already queued on the compute stream (the allocator may hand out memory the running step still
uses), so the next step's input lands only after the running step ends. Here the call gets a pinned host buffer
instead, and the step's first operation copies it in (benchmarks/input_copy.py measures the same outside the
engine). Single device only, as the throughput and latency benchmarks run. The rest of the command line is the
script and its arguments, run as `python <script> <args>` would run it; common.PINNED_INPUT_ENV is exported, so
every record the script writes says so in `env`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/with_pinned_input.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import (
    _bootstrap,  # noqa: F401  (maps jpaged.models etc. in a bare checkout)
    common,
)

USAGE = "usage: with_pinned_input.py SCRIPT [ARGS...]"


def _step_from_host(params: Any, kv_pages: Any, packed: Any, prev_tokens: Any, **statics: Any) -> Any:
    import jax

    from jpaged import runner

    return runner._step(params, kv_pages, jax.device_put(packed, jax.memory.Space.Device), prev_tokens, **statics)


class PinnedInputStep:
    """Stands in for `jpaged.runner._jitted_step`: the packed input goes to pinned host memory before the call."""

    def __init__(self) -> None:
        import jax

        from jpaged import runner

        self.jit = jax.jit(_step_from_host, static_argnames=runner.STEP_STATIC_ARGNAMES, donate_argnames=("kv_pages",))
        self.calls = 0  # steps run with their input staged in pinned host memory (the warm-up's too)

    def _stage(self, packed: Any, kv_pages: Any) -> Any:
        import jax

        devices = jax.tree.leaves(kv_pages)[0].sharding.device_set
        if len(devices) != 1:  # a tensor-parallel step takes its input replicated, not on one device's host memory
            raise SystemExit(f"with_pinned_input.py stages inputs for one device; this engine runs on {len(devices)}")
        staged = jax.device_put(packed, jax.sharding.SingleDeviceSharding(*devices, memory_kind="pinned_host"))
        assert staged.sharding.memory_kind == "pinned_host"
        return staged

    def lower(self, params: Any, kv_pages: Any, packed: Any, prev_tokens: Any, **statics: Any) -> Any:
        return self.jit.lower(params, kv_pages, self._stage(packed, kv_pages), prev_tokens, **statics)

    def __call__(self, params: Any, kv_pages: Any, packed: Any, prev_tokens: Any, **statics: Any) -> Any:
        self.calls += 1
        return self.jit(params, kv_pages, self._stage(packed, kv_pages), prev_tokens, **statics)


def install() -> PinnedInputStep:
    from jpaged import runner

    step = PinnedInputStep()
    runner._jitted_step = step  # type: ignore[assignment]
    return step


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit(USAGE)
    install()
    os.environ[common.PINNED_INPUT_ENV] = "1"
    print("with_pinned_input: each step's packed input staged in pinned host memory", flush=True)
    common.run_script(argv)


if __name__ == "__main__":
    main()
