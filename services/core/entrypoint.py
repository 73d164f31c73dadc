"""The common shape of every service's ``main()``: flags -> config -> logging -> serve."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from moemesh.services.core.config import ServiceConfig, load_config
from moemesh.services.core.logs import setup_logging

C = TypeVar("C", bound=ServiceConfig)


def service_main(
    argv: list[str] | None,
    *,
    service: str,
    description: str | None,
    config_cls: type[C],
    add_arguments: Callable[[argparse.ArgumentParser], None],
    serve: Callable[[C, int | None], Awaitable[None]],
) -> int:
    """Parse flags, build the validated config, set up JSON logs, run ``serve`` until stopped.

    Every flag added by ``add_arguments`` must be named after a config field
    (``--max-num-seqs`` sets ``max_num_seqs``); ``--config FILE`` and
    ``--ready-fd N`` are added here. An invalid config exits with status 2 and
    a message naming the field.
    """
    parser = argparse.ArgumentParser(prog=f"moemesh-{service}", description=description)
    parser.add_argument("--config", help="JSON config file (flags and environment override it)")
    parser.add_argument("--ready-fd", type=int, help="write one JSON line (address, pid) here once serving")
    add_arguments(parser)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "ready_fd")}
    try:
        config = load_config(config_cls, file=args.config, env=os.environ, flags=flags)
    except ValueError as exc:
        print(f"moemesh-{service}: {exc}", file=sys.stderr)
        return 2
    setup_logging(service, config.log_level)
    asyncio.run(serve(config, args.ready_fd))
    return 0
