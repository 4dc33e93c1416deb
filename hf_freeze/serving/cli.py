"""`hf-freeze serve`: load a base and its fine-tunes, then serve them over HTTP with uvicorn.

`register(subparsers)` adds the subcommand to the `hf-freeze` CLI; `python -m hf_freeze.serving.cli serve ...`
runs it alone. A fine-tune that does not belong to the base stops the command before the server starts, with the
file and both fingerprints in the message (exit status 2).
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand (`hf-freeze serve --base PATH --model NAME=PATH ...`) to `subparsers`."""
    parser = subparsers.add_parser(
        "serve", help="serve a base model and its frozen-prefix fine-tunes over HTTP",
        description="Serve a base and any number of its fine-tunes; batches that mix fine-tunes run the frozen "
                    "prefix they share once. Routes: POST /predict /embed /score /generate, GET /health /info "
                    "/metrics; POST /generate_stream (server-sent events); /v1/... for OpenAI's client and POST / for "
                    "huggingface_hub's InferenceClient and text_generation's Client.")
    parser.add_argument("--base", required=True,
                        help="base model folder (or a packaged short name: minilm, mpnet, smollm2)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="a fine-tune to serve under NAME (repeatable): an hf_freeze checkpoint folder "
                             "(suffix-only or full) or a plain transformers folder fine-tuned from the base")
    parser.add_argument("--base-name", default="base", help="name of the base in requests (default: base)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="token budget of one batch")
    parser.add_argument("--max-client-batch-size", type=int, default=32, help="inputs per request at most")
    parser.add_argument("--max-queue", type=int, default=1024, help="waiting inputs at most (429 beyond)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size at most")
    parser.add_argument("--cache-mb", type=float, default=256.0,
                        help="budget of the repeated-input cache of boundary states (0 disables)")
    parser.add_argument("--pooling", choices=["mean", "cls"], default=None,
                        help="embedding pooling (default: the sentence-transformers config, else mean)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="float32",
                        help="dtype every model is served in (auto: the base's saved dtype); a fine-tune trained in "
                             "bf16 needs bfloat16 (default: float32)")
    parser.add_argument("--admin-token", default=None,
                        help="turn on the admin routes (POST /admin/models, DELETE /admin/models/NAME: load and "
                             "remove fine-tunes while serving) for requests with `Authorization: Bearer TOKEN` "
                             "(default: $HF_FREEZE_ADMIN_TOKEN; unset: the routes are off)")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="run every model's full forward (the baseline the shared prefix is measured against)")
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """Load everything (refusing mismatched fine-tunes up front), then run uvicorn until interrupted."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as error:
        print(f"error: `hf-freeze serve` needs the serve extra ({error.name} is missing): "
              "pip install 'hf-freeze[serve]'", file=sys.stderr)
        return 2

    from ..checkpoint import CheckpointError
    from ..commands.errors import CommandError, check_model_source
    from .admin import admin_token
    from .app import create_app
    from .engine import ServingEngine
    from .requests import BaseMismatchServingError

    models = {}
    try:  # a missing, corrupt or unreachable model fails here, in one line, before anything is loaded
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise CommandError(f"--model expects NAME=PATH, got {spec!r}")
            models[name] = check_model_source(path, what=f"--model {name}:")
        base_path = check_model_source(args.base, what="the base")
    except (CommandError, CheckpointError) as error:
        print(f"hf-freeze serve: error: {error}", file=sys.stderr)
        return 2
    try:
        engine = ServingEngine.from_pretrained(
            base_path, models, base_name=args.base_name, pooling=args.pooling,
            cache_bytes=int(args.cache_mb * 2**20), share_prefix=not args.no_share_prefix, dtype=args.dtype)
    except (BaseMismatchServingError, CheckpointError) as error:
        print(f"hf-freeze serve: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    tokenizer = _tokenizer(base_path)
    if tokenizer is None:
        print(f"note: {base_path} has no tokenizer; the server takes token ids only, not text.", file=sys.stderr)
    app = create_app(engine, tokenizer=tokenizer, max_wait_ms=args.max_wait_ms,
                     max_batch_tokens=args.max_batch_tokens, max_client_batch_size=args.max_client_batch_size,
                     max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                     admin_token=admin_token(args.admin_token))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _tokenizer(path: str):
    """The base's tokenizer when its folder has one; without it the server takes token ids only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-freeze")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
