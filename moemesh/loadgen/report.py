"""The benchmark's results as a summary table (rich) and as a JSON document with the settings and versions."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import pathlib
import platform
import sys

from rich.table import Table

from moemesh.loadgen.config import BenchConfig
from moemesh.loadgen.metrics import Stats
from moemesh.loadgen.runner import LevelResult, TargetResult

REPORT_FORMAT = 1  # bumped when a field of the JSON changes meaning
PACKAGES = ("moemesh", "grpcio", "httpx", "numpy", "tokenizers", "rich", "matplotlib")
LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def versions() -> dict[str, str]:
    """Python's, the platform's and the measuring packages' versions."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# ---- JSON ----------------------------------------------------------------------------------------------------------
def level_json(result: LevelResult) -> dict:
    """One level: its load and every figure (latencies in milliseconds, throughputs per second)."""
    return {"mode": result.level.mode, "value": result.level.value, "label": result.level.label,
            **dataclasses.asdict(result.metrics)}


def target_json(result: TargetResult) -> dict:
    return {"target": result.target.url, "model": result.model, "error": result.error,
            "warmup_errors": {kind: dataclasses.asdict(e) for kind, e in result.warmup_errors.items()},
            "levels": [level_json(level) for level in result.levels]}


def report_json(config: BenchConfig, results: list[TargetResult], started_at: str, finished_at: str) -> dict:
    """The whole run as one JSON document."""
    return {"format": REPORT_FORMAT, "started_at": started_at, "finished_at": finished_at,
            "command": sys.argv, "config": config.to_json(), "versions": versions(),
            "targets": [target_json(result) for result in results]}


def write_json(path: pathlib.Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


# ---- the table -----------------------------------------------------------------------------------------------------
def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _p50_p99(stats: Stats) -> str:
    return "-" if stats.p50 is None else f"{_number(stats.p50)} / {_number(stats.p99)}"


def summary_table(results: list[TargetResult], with_goodput: bool) -> Table:
    """One row per target and level: requests, throughputs, latency p50 / p99, and goodput when limits were set."""
    table = Table(title="moemesh bench", title_justify="left")
    for name in ("target", "load", "ok", "errors", "req/s", "out tok/s", "total tok/s", "prompt tok"):
        table.add_column(name, justify="left" if name in ("target", "load") else "right")
    for name, _ in LATENCIES:
        table.add_column(f"{name} ms\np50 / p99", justify="right")
    if with_goodput:
        table.add_column("goodput\nreq/s", justify="right")
    for result in results:
        if result.error:
            table.add_row(result.target.url, "not measured", *["-"] * (len(table.columns) - 2))
        for level in result.levels:
            m = level.metrics
            row = [result.target.url, level.level.label, str(m.completed), str(m.failed),
                   _number(m.request_throughput, 2), _number(m.output_throughput), _number(m.total_token_throughput),
                   _number(m.mean_prompt_tokens), *(_p50_p99(getattr(m, field)) for _, field in LATENCIES)]
            table.add_row(*row, *([_number(m.goodput, 2)] if with_goodput else []))
    return table


def problems(results: list[TargetResult]) -> list[str]:
    """A line for each target that could not be measured and for each kind of failed request."""
    lines = []
    for result in results:
        if result.error:
            lines.append(f"{result.target.url}: not measured: {result.error}")
        for kind, summary in result.warmup_errors.items():
            lines.append(f"{result.target.url} warm-up: {kind} x{summary.count}: {summary.first_message}")
        for level in result.levels:
            for kind, summary in level.metrics.errors.items():
                lines.append(f"{result.target.url} {level.level.label}: {kind} x{summary.count}: "
                             f"{summary.first_message}")
    return lines
