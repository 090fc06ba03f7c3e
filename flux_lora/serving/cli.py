"""`flux-lora`: cog-like commands for people and tests (the pip package of cog has no CLI)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flux_lora.serving.schema import PREDICTORS
from flux_lora.settings import Settings

log = logging.getLogger("flux_lora")


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from flux_lora.generation.tiny import make_tiny_store

    print(make_tiny_store(Path(args.dir)))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from flux_lora.serving.schema import schema_json

    print(schema_json(args.predictor))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from flux_lora.serving.server import serve

    return serve(args.predictor, host=args.host, port=args.port, upload_url=args.upload_url)


def _cmd_predict(args: argparse.Namespace) -> int:
    from flux_lora.serving.local import parse_inputs, run_local

    paths = run_local(args.predictor, parse_inputs(args.input, args.predictor), Path(args.output))
    for path in paths:
        print(path)
    return 0


def _cmd_weights_fetch(args: argparse.Namespace) -> int:
    from flux_lora.weights.cache import WeightCache

    print(WeightCache.from_settings(Settings.from_env()).fetch(args.ref, allow_local=True))  # the operator's own files
    return 0


def _cmd_weights_list(args: argparse.Namespace) -> int:
    from flux_lora.weights.cache import WeightCache

    for entry in WeightCache.from_settings(Settings.from_env()).entries():
        print(f"{entry.size:>12}  {entry.path}  {entry.ref}")
    return 0


def _cmd_weights_clear(args: argparse.Namespace) -> int:
    from flux_lora.weights.cache import WeightCache

    removed = WeightCache.from_settings(Settings.from_env()).clear()
    print(f"removed {removed} cached file(s)")
    return 0


def _cmd_lora_inspect(args: argparse.Namespace) -> int:
    """A prediction's fetch (the same guards and cache) and reading, reported instead of applied."""
    import json

    from flux_lora.generation.pipelines import architecture
    from flux_lora.lora.adapters import rank_budget
    from flux_lora.lora.inspect import inspect_lora
    from flux_lora.lora.names import ModelNames
    from flux_lora.weights.cache import WeightCache
    from flux_lora.weights.refs import shown

    settings = Settings.from_env()
    cache = WeightCache.from_settings(settings)
    path = cache.fetch(args.ref, allow_local=True)  # the operator's own files too
    try:
        names = ModelNames.of(*architecture(settings.weights_dir))
        report = inspect_lora(path, shown(args.ref), names, rank_budget(settings.lora_max_rank),
                              cache.trigger_words(path))
    finally:
        cache.release()
    print(json.dumps(report.to_json(), indent=1) if args.json else "\n".join(report.lines()))
    return 0


def _cmd_weights_download_base(args: argparse.Namespace) -> int:
    from flux_lora.weights.store import ensure_store, parse_models

    root = Settings.from_env().weights_dir
    ensure_store(root, models=parse_models(args.models), safety=not args.no_safety)
    print(root)
    return 0


class _PredictHelp(argparse.Action):
    """`predict --help` lists the inputs of the variant named before it, read from its schema (on demand:
    loading the schema imports cog, too slow for every command)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show this help and the inputs")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from flux_lora.serving.local import inputs_help

        parser.epilog = inputs_help(getattr(namespace, "predictor", "hotswap"))
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-lora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str, **kwargs: Any
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, **kwargs)
        p.set_defaults(handler=handler)
        return p

    def predictor_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--predictor", choices=list(PREDICTORS), default="hotswap")

    p = add("make-tiny", _cmd_make_tiny, "write a tiny random FLUX store (offline, seconds)")
    p.add_argument("dir")

    p = add("schema", _cmd_schema, "print the OpenAPI schema `cog build` would write")
    predictor_option(p)

    p = add("serve", _cmd_serve, "run the cog HTTP server on a predictor")
    predictor_option(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--upload-url", default=None, help="PUT output files here (as cog does)")

    p = add("predict", _cmd_predict, "run one prediction, like `cog predict`", add_help=False,
            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action=_PredictHelp)
    predictor_option(p)
    p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE",
                   help="an input; NAME=@path for a file")
    p.add_argument("-o", "--output", default="outputs", help="directory for the output files")

    lora = sub.add_parser("lora", help="LoRA files as the server reads them")
    lsub = lora.add_subparsers(dest="lora_command", required=True)
    p = lsub.add_parser("inspect", help="fetch a LoRA as a prediction does and report what the server reads in it")
    p.add_argument("ref", help="any reference replicate_weights takes, or a local file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_cmd_lora_inspect)

    weights = sub.add_parser("weights", help="the LoRA weight cache and the base-model store")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    p = wsub.add_parser("fetch", help="resolve a LoRA reference into a verified cached file")
    p.add_argument("ref")
    p.set_defaults(handler=_cmd_weights_fetch)
    wsub.add_parser("list", help="list the cached LoRA files").set_defaults(handler=_cmd_weights_list)
    wsub.add_parser("clear", help="empty the LoRA cache").set_defaults(handler=_cmd_weights_clear)
    p = wsub.add_parser("download-base", help="download the base models into the store (resumable)")
    p.add_argument("--models", default="dev,schnell", help="comma-separated: dev, schnell")
    p.add_argument("--no-safety", action="store_true", help="skip the two safety checker models")
    p.set_defaults(handler=_cmd_weights_download_base)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else Settings.log_level(),
        format="%(message)s",
    )
    try:
        return args.handler(args)
    except Exception as exc:  # a one-line reason, never a stack trace, for expected failures
        from flux_lora.errors import Failure, UserError

        if isinstance(exc, UserError):
            print(f"error: {exc.message if isinstance(exc, Failure) else exc}", file=sys.stderr)
            return 1
        raise
