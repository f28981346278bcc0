"""`jpaged generate` and `jpaged serve`; flags come from the config dataclasses (jpaged/config.py)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from jpaged.config import add_cli_arguments, add_dataclass_arguments, config_from_args
from jpaged.sampling_params import SamplingParams


def _generate(args: argparse.Namespace) -> int:
    from jpaged.engine import LLMEngine

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    params = SamplingParams(**{k: v for k, v in vars(args).items() if k in fields and k != "seed" and v is not None})
    engine = LLMEngine(config_from_args(args))
    stream = len(args.prompts) == 1
    ids = [engine.add_request(None, prompt, params) for prompt in args.prompts]
    printed = 0
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if stream:
                text = out.outputs[0].text
                print(text[printed:], end="", flush=True)
                printed = len(text)
            if out.finished:
                finished[out.request_id] = out
    if stream:
        print()
        return 0
    for rid, prompt in zip(ids, args.prompts, strict=True):
        for completion in finished[rid].outputs:
            print(f"--- {prompt!r} [{completion.index}] ({completion.finish_reason})")
            print(prompt + completion.text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from jpaged.server.app import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jpaged", description="LLM inference and serving in JAX")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts offline and print the text")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    add_cli_arguments(gen)
    add_dataclass_arguments(gen, SamplingParams, exclude=("seed", "n", "logprobs", "prompt_logprobs"))
    gen.set_defaults(handler=_generate, temperature=0.0, max_tokens=64)

    try:
        from jpaged.server.app import add_server_arguments
    except ImportError:  # the server issue has not landed yet
        return parser
    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    add_server_arguments(serve)
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"jpaged: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
