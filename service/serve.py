"""`captioner serve`, in the full CLI (captioner/cli.py) and the torch-free one (captioner/inference/cli.py): its
flags, the settings they make (over CAPTIONER_* variables), a one-line check that this install can serve them,
and uvicorn."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from captioner.usage import UsageError, port_type

if TYPE_CHECKING:
    from .settings import Settings

# The CLIs build every subcommand's parser at start: the service's own modules (pydantic, ONNX Runtime) are
# imported only once `serve` runs, so `captioner caption` does not pay for them.


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=port_type, default=8000)
    p.add_argument("--max-batch", type=int, default=None, help="micro-batch size (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="how long a micro-batch waits to fill")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def server_settings(args: argparse.Namespace, **given: object) -> Settings:
    """Settings from the flags (those given) over the environment; UsageError naming each bad value, or naming
    what this install cannot serve (a checkpoint without PyTorch)."""
    from pydantic import ValidationError

    from .model import ModelLoadError, serving_engine
    from .settings import Settings

    given |= {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid settings (flags or CAPTIONER_* variables): {problems}") from None
    try:
        serving_engine(settings)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    return settings


def run_server(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0
