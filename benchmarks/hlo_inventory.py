"""Which kernels a compiled step launches, by the source lines they come from: an inventory of an XLA dump.

    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=_step" \\
        python benchmarks/profile_step.py --settle 2 --steps 2 --trace-steps 0 --batches 128 1
    python benchmarks/hlo_inventory.py /tmp/hlo/*jit__step*after_optimizations.txt

A decode step of a 7B model is ~700 kernel launches; on an H200 one that moves little costs 1.5-5 us whatever it
does, so which code emits how many of them matters as much as the big matmuls. Every instruction of a module's ENTRY
computation that launches work (a fusion, a custom call such as a Pallas kernel or a cuBLAS matmul, a copy, ...)
is attributed to the innermost frames of its stack trace in the repository's model, kernel and engine code (XLA
keeps the trace in the dump's StackFrames table; instructions it left without one, such as its own split-K GEMM
fusions, are counted under "–"). Counts only: a trace (profile_step.py) says how long each takes. Only the ENTRY
computation is read: a while, conditional, call or async op there is one row, its body's kernels uncounted, and the
script says so (the engine's step has none: no data-dependent control flow).
The eighth session's dump of the 7B decode step found the sampler behind ~200 of them (206 at batch 1, 209 at 128).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/hlo_inventory.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common

# Instructions that name or reshape a value without launching anything.
NOT_LAUNCHES = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}
# Frames outside what a step runs, as repository paths: the driver scripts and the engine's loop around the call.
SKIPPED_PREFIXES = ("benchmarks/", "jpaged/engine.py", "jpaged/llm.py", "<string>")
# Ops whose called computations hold kernels this inventory does not descend into.
CONTROL_FLOW = {"while", "conditional", "call", "async-start"}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = .+? ([a-z][a-z0-9-]*)\(")
_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def stack_tables(text: str) -> dict[int, list[tuple[str, str, int]]]:
    """Stack frame id -> its frames, innermost first, as (file, function, line); from the dump's four tables."""
    files: dict[int, str] = {}
    functions: dict[int, str] = {}
    locations: dict[int, tuple[str, str, int]] = {}
    parents: dict[int, tuple[int, int]] = {}
    section = None
    for line in text.splitlines():
        if line in _SECTIONS:
            section = line
            continue
        if not line.strip() or not line[0].isdigit():
            section = None if line.strip() else section
            continue
        key, rest = line.split(" ", 1)
        fields = dict(re.findall(r"(\w+)=(\d+)", rest))
        if section == "FileNames":
            files[int(key)] = rest.strip('"')
        elif section == "FunctionNames":
            functions[int(key)] = rest.strip('"')
        elif section == "FileLocations":
            where = files[int(fields["file_name_id"])], functions[int(fields["function_name_id"])], int(fields["line"])
            locations[int(key)] = where
        elif section == "StackFrames":  # parent_frame_id is the parent's id + 1; a root's is 1 (no frame 0)
            parents[int(key)] = int(fields["file_location_id"]), int(fields["parent_frame_id"]) - 1

    def frames(frame: int) -> list[tuple[str, str, int]]:
        out: list[tuple[str, str, int]] = []
        while frame in parents and len(out) < 64:
            location, frame = parents[frame]
            out.append(locations[location])
        return out

    return {frame: frames(frame) for frame in parents}


def _short(path: str, repo: str) -> str:
    return path.split(repo, 1)[1] if repo and repo in path else path


def inventory(text: str, *, depth: int = 2, repo: str = "") -> list[dict[str, Any]]:
    """The ENTRY computation's launches grouped by (kind, where): where = the `depth` innermost frames whose paths,
    `repo` cut from them, do not start with SKIPPED_PREFIXES. Most launches first."""
    start = text.index("\nENTRY ")
    entry = text[start : text.index("\n}\n", start)]
    stacks = stack_tables(text)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in entry.splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match or match.group(2) in NOT_LAUNCHES:
            continue
        name, op = match.groups()
        target = re.search(r'custom_call_target="([^"]*)"', line)
        kind = f"custom-call {target.group(1)}" if target else re.sub(r"[._]\d+$", "", name) if op == "fusion" else op
        frame = re.search(r"stack_frame_id=(\d+)", line)
        frames = stacks.get(int(frame.group(1)), []) if frame else []
        inner = [(_short(f[0], repo), f[1], f[2]) for f in frames]
        inner = [f for f in inner if not f[0].startswith(SKIPPED_PREFIXES)][:depth]
        where = " < ".join(f"{path}:{line} {function}" for path, function, line in inner) or "–"
        counts[(kind, where)] += 1
    return [{"launches": n, "kind": kind, "where": where} for (kind, where), n in counts.most_common()]


def by_file(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Launches per innermost source file."""
    totals: collections.Counter[str] = collections.Counter()
    for row in rows:
        totals[row["where"].split(":", 1)[0]] += row["launches"]
    return [{"file": f, "launches": n} for f, n in totals.most_common()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dumps", nargs="+", type=Path, help="*after_optimizations.txt files of an XLA text dump")
    parser.add_argument("--depth", type=int, default=2, help="source frames to show per launch")
    parser.add_argument("--top", type=int, default=40, help="rows per module in the printed table")
    common.add_output_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.depth < 1:
        raise SystemExit(f"--depth must be >= 1, got {args.depth}")
    repo = str(Path(__file__).resolve().parent.parent) + "/"
    modules = []
    for path in args.dumps:
        text = path.read_text()
        if "\nENTRY " not in text:
            raise SystemExit(f"{path}: no ENTRY computation (want an *after_optimizations.txt HLO text dump)")
        rows = inventory(text, depth=args.depth, repo=repo)
        total = sum(r["launches"] for r in rows)
        nested = sorted({r["kind"] for r in rows} & CONTROL_FLOW)
        if nested:
            common.log(f"{path.name}: {', '.join(nested)} in ENTRY: the kernels of their bodies are not counted")
        modules.append({"dump": str(path), "launches": total, "by_file": by_file(rows), "rows": rows})
        print(common.table(by_file(rows), [("file", "file"), ("launches", "launches")],
                           title=f"{path.name}: {total} launches"))  # fmt: skip
        print(common.table(rows[: args.top], [("launches", "launches"), ("kind", "kind"), ("where", "where")]))
    record = {"benchmark": "hlo_inventory", "args": vars(args), "modules": modules}
    common.save(args, record)
    return record


if __name__ == "__main__":
    main()
