"""The `loraplex` command: `serve` runs a server; `generate` and `info` call one.

    loraplex serve [--config FILE] [--model DIR] [--adapter NAME=DIR ...] [--port N] [...]
    loraplex generate [--adapter NAME] "What is the capital of France?"
    loraplex info

`serve --help` lists every setting. The calling verbs read the server address from --server or
$LORAPLEX_SERVER, the API key from --api-key or $LORAPLEX_API_KEY, and use TLS with --tls (system
root certificates) or --tls-ca FILE (a PEM root certificate, e.g. a self-signed server's own).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from loraplex.client.client import DEFAULT_TARGET, Client


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    args = _parser().parse_args(argv)
    try:
        root_certificates = args.tls_ca.read_bytes() if args.tls_ca else None
        with Client(args.server, api_key=args.api_key, tls=args.tls, root_certificates=root_certificates) as client:
            return args.run(client, args)
    except grpc.RpcError as error:
        print(f"loraplex {args.verb}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


def serve(argv: list[str]) -> int:
    """`loraplex serve`: settings from flags, $LORAPLEX_* and --config FILE (TOML); runs until SIGTERM."""
    import asyncio

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from loraplex.server.settings import load_settings

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=os.environ.get("LORAPLEX_CONFIG"))
    known, rest = pre.parse_known_args(argv)
    try:
        settings = load_settings(rest, known.config)
    except (ValidationError, SettingsError, FileNotFoundError) as error:
        print(f"loraplex serve: invalid settings: {error}", file=sys.stderr)
        return 2
    from loraplex.server.app import serve as run_server

    try:
        asyncio.run(run_server(settings))
    except (OSError, ValueError) as error:  # unusable model or adapter folder, port in use, ...
        print(f"loraplex serve: {error}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{serve,generate,info}")
    verbs.add_parser("serve", help="run a server (`loraplex serve --help` lists every setting)")
    generate = verbs.add_parser("generate", help="generate from a prompt, streaming text to the terminal")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("prompt", nargs="?", help="prompt text")
    prompt.add_argument("--token-ids", type=int, nargs="+", help="prompt as token ids instead of text")
    generate.add_argument("--adapter", default="",
                          help="NAME or NAME@VERSION (VERSION: 8+ hex digits of the sha256); default: the base model")
    generate.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    generate.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: the server's)")
    generate.add_argument("--temperature", type=float, help="0 (default) is greedy")
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int)
    generate.set_defaults(run=_generate)
    info = verbs.add_parser("info", help="show the server's model, adapters, limits and versions (JSON)")
    info.set_defaults(run=_info)
    for verb in (generate, info):
        verb.add_argument("--timeout", type=float, help="deadline in seconds (retries included)")
        verb.add_argument("--server", default=os.environ.get("LORAPLEX_SERVER", DEFAULT_TARGET), help="HOST:PORT")
        verb.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"))
        verb.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
        verb.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM root certificate to verify the server "
                          "with (implies --tls)")
    return parser


def _generate(client: Client, args: argparse.Namespace) -> int:
    prompt = args.prompt if args.token_ids is None else args.token_ids
    completion = None
    for chunk in client.generate_stream(
        prompt, args.adapter, timeout=args.timeout, chat=args.token_ids is None and not args.raw,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    ):
        print(chunk.text, end="", flush=True)
        completion = chunk.completion or completion
    print()
    if completion is not None:
        version = f"@{completion.adapter_version[:12]}" if completion.adapter else ""
        print(f"[{completion.finish_reason.value}: {completion.generated_tokens} tokens, "
              f"{completion.adapter or 'base model'}{version}]", file=sys.stderr)
    return 0


def _info(client: Client, args: argparse.Namespace) -> int:
    print(json_format.MessageToJson(client.server_info(timeout=args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
