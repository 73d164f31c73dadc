"""`moemesh bench` once its flags are parsed: run with a progress bar, print the summary, write the files.

The exit status is 0 when every measured request succeeded, 1 when a request failed or a target could not be
measured (the summary and the files are still written, with the errors by status).
"""

from __future__ import annotations

import asyncio
import datetime
import pathlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from moemesh.loadgen.config import BenchConfig
from moemesh.loadgen.dataset import PreparedPrompts, build_dataset
from moemesh.loadgen.report import problems, report_json, summary_table, write_json
from moemesh.loadgen.runner import TargetResult, run_bench

REPORT_WIDTH = 200  # columns of the summary when it goes to a file or a pipe rather than a terminal


def prepare(config: BenchConfig) -> PreparedPrompts:
    """The run's dataset, built before any request so that a bad tokenizer or prompt file fails at once."""
    return PreparedPrompts(build_dataset(config.dataset, config.seed))


def measure(config: BenchConfig, dataset: PreparedPrompts, console: Console) -> list[TargetResult]:
    """Every target and level, with a progress bar on `console` that goes away when done."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        return asyncio.run(run_bench(config, dataset, progress))


def run(config: BenchConfig, dataset: PreparedPrompts, json_path: pathlib.Path | None,
        png_path: pathlib.Path | None) -> int:
    """Measure, print the summary (stdout) and problems (stderr), write the JSON and PNG; the exit status."""
    out = Console() if Console().is_terminal else Console(width=REPORT_WIDTH)
    err = Console(stderr=True, soft_wrap=True)  # an error message stays on one line
    started_at = _now()
    results = measure(config, dataset, err)
    out.print(summary_table(results, config.goodput is not None))
    for line in problems(results):
        err.print(Text.assemble(("error ", "bold red"), line))
    if json_path is not None:
        write_json(json_path, report_json(config, results, started_at, _now()))
        err.print(f"wrote {json_path}", highlight=False)
    if png_path is not None:
        from moemesh.loadgen.plot import write_png  # matplotlib loads in about a second: only when asked for

        write_png(png_path, results)
        err.print(f"wrote {png_path}", highlight=False)
    failed = any(result.error or result.failed_requests for result in results)
    return 1 if failed else 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
