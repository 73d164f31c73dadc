"""The common shape of every service's ``main()``: flags -> config -> logging -> serve."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from moemesh.services.core.config import ServiceConfig, add_flags, flag_values, load_config
from moemesh.services.core.logs import setup_logging
from moemesh.services.core.tracing import setup_tracing, shutdown_tracing

C = TypeVar("C", bound=ServiceConfig)
SECRETS_DIR_ENV = "MOEMESH_SECRETS_DIR"
EVENT_LOOP_ENV = "MOEMESH_EVENT_LOOP"  # "uvloop" (the default) or "asyncio"


def service_main(
    argv: list[str] | None,
    *,
    service: str,
    description: str | None,
    config_cls: type[C],
    serve: Callable[[C, int | None], Awaitable[None]],
) -> int:
    """Parse flags, build the validated config, set up JSON logs, run ``serve`` until stopped.

    Every field of ``config_cls`` is a flag (``--max-num-seqs`` sets ``max_num_seqs``, with the field's
    description as its help); ``--config FILE``, ``--secrets-dir DIR`` and ``--ready-fd N`` are added
    here. An invalid config exits with status 2 and a message naming the field.
    """
    parser = argparse.ArgumentParser(prog=f"moemesh-{service}", description=description)
    parser.add_argument("--config", help="JSON config file (secret files, environment and flags override it)")
    parser.add_argument("--secrets-dir", default=os.environ.get(SECRETS_DIR_ENV),
                        help=f"directory of secret files, one per setting named like its environment variable "
                             f"(a mounted Kubernetes Secret) [env {SECRETS_DIR_ENV}]")
    parser.add_argument("--ready-fd", type=int, help="write one JSON line (address, pid) here once serving")
    flags = add_flags(parser, config_cls)
    args = parser.parse_args(argv)
    try:
        config = load_config(config_cls, file=args.config, secrets_dir=args.secrets_dir, env=os.environ,
                             flags=flag_values(flags, args))
    except ValueError as exc:
        print(f"moemesh-{service}: {exc}", file=sys.stderr)
        return 2
    setup_logging(service, config.log_level)
    setup_tracing(service)
    try:
        run_event_loop(serve(config, args.ready_fd))
    finally:
        shutdown_tracing()  # the spans still batched go out before the process ends
    return 0


def run_event_loop(main: Awaitable[None]) -> None:
    """Run `main` on uvloop (libuv's loop: less CPU per streamed message on every hop) unless MOEMESH_EVENT_LOOP
    says "asyncio"."""
    choice = os.environ.get(EVENT_LOOP_ENV, "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise SystemExit(f"{EVENT_LOOP_ENV} must be 'uvloop' or 'asyncio', not {choice!r}")
    if choice == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
