"""The `loraplex` command: `serve` runs a server; `http-shim` serves the HTTP API in front of a remote one;
`generate`, `info` and `adapters ...` call one.

    loraplex serve [--config FILE] [--model DIR] [--adapter NAME=DIR ...] [--port N] [...]
    loraplex http-shim --grpc-target HOST:PORT [--port 8000]  # the HTTP API alone, in front of a server
    loraplex generate [--adapter NAME] "What is the capital of France?"
    loraplex info
    loraplex adapters list [--json]                        # name, version, rank, targets, size, tier, use
    loraplex adapters describe NAME [--json]               # every version of one adapter
    loraplex adapters load NAME SOURCE [--warm]            # SOURCE: /abs/peft_folder or s3://bucket/prefix
    loraplex adapters unload NAME [--version HEX] [--wait]
    loraplex adapters validate SOURCE                      # exit 0 when valid, 1 (and the problem) when not
    loraplex adapters pin|unpin NAME
    loraplex adapters prefetch NAME[@VERSION]
    loraplex tenants list [--json]                         # tenants and adapters: limits, in flight, tokens
    loraplex tenants reload                                # read the quotas file again (as SIGHUP does)

`serve --help` lists every setting. The calling verbs read the server address from --server or
$LORAPLEX_SERVER, the API key from --api-key or $LORAPLEX_API_KEY, and use TLS with --tls (system
root certificates) or --tls-ca FILE (a PEM root certificate, e.g. a self-signed server's own).
`adapters` and `tenants` need a key with the "admin" scope; a local SOURCE is a path on the server's machine,
under its `adapters.allowed_roots`. Errors print `loraplex VERB: CODE: details` and exit 1.
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
from loraplex.v1 import admin_pb2 as admin_pb
from loraplex.v1 import tenants_pb2 as tenants_pb


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    args = _parser().parse_args(argv)
    if args.verb == "http-shim":
        return http_shim(args)
    try:
        root_certificates = args.tls_ca.read_bytes() if args.tls_ca else None
        with Client(args.server, api_key=args.api_key, tls=args.tls, root_certificates=root_certificates) as client:
            return args.run(client, args)
    except grpc.RpcError as error:
        verb = f"{args.verb} {args.action}" if args.verb in ("adapters", "tenants") else args.verb
        print(f"loraplex {verb}: {error.code().name}: {error.details()}", file=sys.stderr)
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


def http_shim(args: argparse.Namespace) -> int:
    """`loraplex http-shim`: the OpenAI-style HTTP API on this machine, in front of a remote gRPC server."""
    import asyncio

    from loraplex.server.api.remote_backend import serve_translator

    root_certificates = args.tls_ca.read_bytes() if args.tls_ca else None
    try:
        asyncio.run(serve_translator(args.grpc_target, args.host, args.port, tls=args.tls,
                                     root_certificates=root_certificates))
    except OSError as error:  # port in use, ...
        print(f"loraplex http-shim: {error}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True,
                                  metavar="{serve,http-shim,generate,info,adapters,tenants}")
    verbs.add_parser("serve", help="run a server (`loraplex serve --help` lists every setting)")
    shim = verbs.add_parser("http-shim", help="serve the OpenAI-style HTTP API in front of a remote loraplex "
                            "gRPC server (API keys are checked by that server)")
    shim.add_argument("--grpc-target", default=os.environ.get("LORAPLEX_SERVER", DEFAULT_TARGET), metavar="HOST:PORT",
                      help="the loraplex server's gRPC address (default: $LORAPLEX_SERVER or %(default)s)")
    shim.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    shim.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one (default: %(default)s)")
    shim.add_argument("--tls", action="store_true", help="reach the server with TLS (system root certificates)")
    shim.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM root certificate to verify the server with "
                      "(implies --tls)")
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
    constraint = generate.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE_OR_JSON",
                            help="constrain the output to this JSON schema (a file, or the JSON text itself)")
    constraint.add_argument("--regex", help="constrain the output to match this regular expression")
    constraint.add_argument("--grammar", metavar="FILE", type=Path, help="constrain the output to this EBNF grammar")
    constraint.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    generate.set_defaults(run=_generate)
    info = verbs.add_parser("info", help="show the server's model, adapters, limits and versions (JSON)")
    info.set_defaults(run=_info)
    adapters = _adapters_parser(verbs)
    tenants = _tenants_parser(verbs)
    for verb in (generate, info, *adapters, *tenants):
        verb.add_argument("--timeout", type=float, help="deadline in seconds (retries included)")
        verb.add_argument("--server", default=os.environ.get("LORAPLEX_SERVER", DEFAULT_TARGET), help="HOST:PORT")
        verb.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"))
        verb.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
        verb.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM root certificate to verify the server "
                          "with (implies --tls)")
    return parser


def _adapters_parser(verbs: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """`loraplex adapters ACTION`: the adapter administration verbs; returns the action parsers."""
    adapters = verbs.add_parser("adapters", help="list, load, replace, unload, pin and validate adapters "
                                "(needs the admin scope)")
    actions = adapters.add_subparsers(dest="action", required=True,
                                      metavar="{list,describe,load,unload,validate,pin,unpin,prefetch}")
    listing = actions.add_parser("list", help="every adapter: current version, rank, targets, size, tier, "
                                 "pinned, requests")
    listing.add_argument("--json", action="store_true", help="print the ListAdaptersResponse as JSON")
    listing.set_defaults(run=_adapters_list)
    describe = actions.add_parser("describe", help="one adapter with every registered version")
    describe.add_argument("name")
    describe.add_argument("--json", action="store_true", help="print the AdapterStatus as JSON")
    describe.set_defaults(run=_adapters_describe)
    source_help = "absolute path of a PEFT LoRA folder on the server's machine, under its adapters.allowed_roots, " \
                  "or s3://BUCKET/PREFIX"
    load = actions.add_parser("load", help="validate and store an adapter and make it NAME's current version "
                              "(replacing the previous one atomically)")
    load.add_argument("name")
    load.add_argument("source", nargs="?", default="", help=f"{source_help}; omitted: the version of NAME the "
                      "server's adapter store holds and stored last (e.g. one serve-train stored there)")
    load.add_argument("--warm", action="store_true", help="also load it into a device slot now, not on first use")
    load.set_defaults(run=_adapters_load)
    unload = actions.add_parser("unload", help="unregister an adapter (or one old version) and delete its files")
    unload.add_argument("name")
    unload.add_argument("--version", default="", metavar="HEX",
                        help="remove only this old version (sha256 or 8+ hex digits of it)")
    unload.add_argument("--wait", action="store_true", help="if requests still use it: unregister now and wait "
                        "for them (up to --timeout) instead of refusing")
    unload.set_defaults(run=_adapters_unload)
    validate = actions.add_parser("validate", help="check that an adapter can be loaded on the server (stores "
                                  "nothing); exit 1 when it cannot")
    validate.add_argument("source", help=source_help)
    validate.set_defaults(run=_adapters_validate)
    pin = actions.add_parser("pin", help="keep an adapter's current version in a device slot")
    unpin = actions.add_parser("unpin", help="stop keeping an adapter in a device slot")
    for verb, pinned in ((pin, True), (unpin, False)):
        verb.add_argument("name")
        verb.set_defaults(run=_adapters_pin, pinned=pinned)
    prefetch = actions.add_parser("prefetch", help="start loading an adapter into a device slot ahead of use")
    prefetch.add_argument("adapter", metavar="NAME[@VERSION]")
    prefetch.set_defaults(run=_adapters_prefetch)
    return list(actions.choices.values())


def _tenants_parser(verbs: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """`loraplex tenants ACTION`: the tenant administration verbs; returns the action parsers."""
    tenants = verbs.add_parser("tenants", help="list tenants' and adapters' quotas and usage, reload the quotas "
                               "(needs the admin scope)")
    actions = tenants.add_subparsers(dest="action", required=True, metavar="{list,reload}")
    listing = actions.add_parser("list", help="every tenant and adapter: limits, requests in flight and waiting, "
                                 "tokens served, token bucket")
    listing.add_argument("--json", action="store_true", help="print the ListTenantsResponse as JSON")
    listing.set_defaults(run=_tenants_list)
    reload = actions.add_parser("reload", help="have the server read its quotas file again and put it in force")
    reload.add_argument("--json", action="store_true", help="print the ListTenantsResponse as JSON")
    reload.set_defaults(run=_tenants_reload)
    return list(actions.choices.values())


def _generate(client: Client, args: argparse.Namespace) -> int:
    prompt = args.prompt if args.token_ids is None else args.token_ids
    completion = None
    for chunk in client.generate_stream(
        prompt, args.adapter, timeout=args.timeout, chat=args.token_ids is None and not args.raw,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, json_schema=_text_or_file(args.json_schema), regex=args.regex,
        grammar=args.grammar.read_text() if args.grammar else None, json_object=args.json_object,
    ):
        print(chunk.text, end="", flush=True)
        completion = chunk.completion or completion
    print()
    if completion is not None:
        version = f"@{completion.adapter_version[:12]}" if completion.adapter else ""
        print(f"[{completion.finish_reason.value}: {completion.generated_tokens} tokens, "
              f"{completion.adapter or 'base model'}{version}]", file=sys.stderr)
    return 0


def _text_or_file(value: str | None) -> str | None:
    """A JSON schema given as text, or the text of the file it names."""
    if value is None or value.lstrip().startswith("{"):
        return value
    return Path(value).read_text()


def _info(client: Client, args: argparse.Namespace) -> int:
    print(json_format.MessageToJson(client.server_info(timeout=args.timeout)))
    return 0


def _adapters_list(client: Client, args: argparse.Namespace) -> int:
    response = client.list_adapters(timeout=args.timeout)
    if args.json:
        print(json_format.MessageToJson(response))
    elif response.adapters:
        _print_adapters(response.adapters)
    else:
        print("no adapters are registered", file=sys.stderr)
    return 0


def _adapters_describe(client: Client, args: argparse.Namespace) -> int:
    status = client.describe_adapter(args.name, timeout=args.timeout)
    if args.json:
        print(json_format.MessageToJson(status))
        return 0
    print(f"{status.name}: current version {status.current_version[:12]}, {'pinned' if status.pinned else 'unpinned'}"
          f", requests: {status.requests_total} in all, {status.active_requests} active")
    rows = [["VERSION", "RANK", "TARGETS", "SIZE", "DTYPE", "TIER", "ACTIVE", ""]]
    for version in status.versions:
        rows.append([version.digest[:12], *_summary_cells(version), version.dtype or "-", _tier(version),
                     str(version.active_requests), "current" if version.digest == status.current_version else ""])
    _print_table(rows)
    _print_problems(status.name, status.versions)
    return 0


def _adapters_load(client: Client, args: argparse.Namespace) -> int:
    response = client.load_adapter(args.name, args.source, warm=args.warm, timeout=args.timeout)
    status = response.adapter
    print(f"{'loaded' if response.changed else 'unchanged (already the current version)'}: "
          f"{status.name}@{status.current_version[:12]}")
    _print_adapters([status])
    return 0


def _adapters_unload(client: Client, args: argparse.Namespace) -> int:
    response = client.unload_adapter(args.name, args.version, wait=args.wait, timeout=args.timeout)
    versions = ", ".join(digest[:12] for digest in response.removed_versions)
    print(f"unloaded {args.name}: {versions}")
    if not response.drained:
        print("requests still use it; its memory and files are released when they end", file=sys.stderr)
    return 0


def _adapters_validate(client: Client, args: argparse.Namespace) -> int:
    response = client.validate_adapter(args.source, timeout=args.timeout)
    if not response.valid:
        print(f"invalid: {response.problem}")
        return 1
    summary = response.summary
    rank, targets, size = _summary_cells(summary)
    print(f"valid: version {summary.digest}, rank {rank}, targets {targets}, {size}, {summary.dtype}")
    return 0


def _adapters_pin(client: Client, args: argparse.Namespace) -> int:
    _print_adapters([client.pin_adapter(args.name, args.pinned, timeout=args.timeout)])
    return 0


def _adapters_prefetch(client: Client, args: argparse.Namespace) -> int:
    _print_adapters([client.prefetch_adapter(args.adapter, timeout=args.timeout)])
    return 0


def _tenants_list(client: Client, args: argparse.Namespace) -> int:
    _print_tenants(client.list_tenants(timeout=args.timeout), args.json)
    return 0


def _tenants_reload(client: Client, args: argparse.Namespace) -> int:
    response = client.reload_quotas(timeout=args.timeout)
    print("quotas reloaded", file=sys.stderr)
    _print_tenants(response, args.json)
    return 0


def _print_tenants(response: tenants_pb.ListTenantsResponse, as_json: bool) -> None:
    """One row per tenant, then one per adapter ("-" where there is no limit)."""
    if as_json:
        print(json_format.MessageToJson(response))
        return
    rows = [["KIND", "NAME", "WEIGHT", "CLASS", "MAX_CONCURRENT", "MAX_QUEUED", "TOKENS/MIN", "IN_FLIGHT", "QUEUED",
             "SERVED", "BUCKET"]]
    for kind, statuses in (("tenant", response.tenants), ("adapter", response.adapters)):
        for status in statuses:
            limits = status.limits
            cells = [_limit(limits, name) for name in ("max_concurrent", "max_queued", "tokens_per_minute")]
            weight = f"{limits.weight:g}"
            priority = tenants_pb.Priority.Name(limits.priority).removeprefix("PRIORITY_").lower()
            bucket = f"{status.bucket_tokens:.0f}" if status.HasField("bucket_tokens") else "-"
            rows.append([kind, status.name or "(base)", weight, priority, *cells, str(status.in_flight),
                         str(status.queued), str(status.served_tokens), bucket])
    _print_table(rows)


def _limit(limits: tenants_pb.QuotaLimits, name: str) -> str:
    return str(getattr(limits, name)) if limits.HasField(name) else "-"


def _print_adapters(adapters: Sequence[admin_pb.AdapterStatus]) -> None:
    """One row per adapter, describing its current version."""
    rows = [["NAME", "VERSION", "RANK", "TARGETS", "SIZE", "TIER", "PINNED", "ACTIVE", "REQUESTS"]]
    currents = [next((v for v in status.versions if v.digest == status.current_version),
                     admin_pb.AdapterVersion(digest=status.current_version)) for status in adapters]
    for status, current in zip(adapters, currents, strict=True):
        rows.append([status.name, current.digest[:12], *_summary_cells(current), _tier(current),
                     "yes" if status.pinned else "no", str(status.active_requests), str(status.requests_total)])
    _print_table(rows)
    for status, current in zip(adapters, currents, strict=True):
        _print_problems(status.name, [current])


def _summary_cells(version: admin_pb.AdapterVersion) -> list[str]:
    """Rank, targets and size of a version ("-" when its stored files no longer pass validation)."""
    if not version.rank:
        return ["-", "-", "-"]
    return [str(version.rank), ",".join(version.targets), _size(version.size_bytes)]


def _tier(version: admin_pb.AdapterVersion) -> str:
    if version.tier == admin_pb.ADAPTER_TIER_UNSPECIFIED:
        return "-"
    return admin_pb.AdapterTier.Name(version.tier).removeprefix("ADAPTER_TIER_").lower()


def _size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _print_problems(name: str, versions: Sequence[admin_pb.AdapterVersion]) -> None:
    for version in versions:
        if version.problem:
            print(f"{name}@{version.digest[:12]}: {version.problem}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
