"""`moemesh bench` through the CLI: against the demo mesh over gRPC and HTTP, and against a port nobody listens on.

A failed request is reported by its status (gRPC code name, or the HTTP client's error) in the summary, on stderr
and in the JSON, and makes the command exit 1.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moemesh.cache.embedded import free_port
from moemesh.cli import demo_model_dir, main

REQUESTS, OUTPUT_TOKENS, PROMPT_TOKENS = 8, 16, 32
LEVEL_FIELDS = {"mode", "value", "label", "completed", "failed", "duration_s", "request_throughput",
                "output_throughput", "total_token_throughput", "total_output_tokens", "total_prompt_tokens",
                "mean_prompt_tokens", "total_cached_tokens", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput",
                "errors"}
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@pytest.fixture(scope="module")
def mesh(traced_mesh):
    """The run's shared demo mesh (tests/conftest.py)."""
    return traced_mesh


def bench(*args: str):
    return CliRunner().invoke(main, ["bench", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(mesh, tmp_path_factory):
    """One bench of both targets at two concurrency levels, with its JSON report and figure."""
    out = tmp_path_factory.mktemp("bench")
    result = bench("--target", f"grpc://{mesh.gateway}", "--target", f"http://{mesh.http}",
                   "--concurrency", "1,4", "--requests", str(REQUESTS), "--warmup", "1",
                   "--output-tokens", str(OUTPUT_TOKENS), "--prompt-tokens", str(PROMPT_TOKENS),
                   "--tokenizer", str(demo_model_dir()), "--goodput", "ttft:60000,tpot:60000",
                   "--json", str(out / "bench.json"), "--png", str(out / "bench.png"))
    return result, out


def test_the_bench_measures_both_targets_without_errors(run, mesh):
    result, _ = run
    assert result.exit_code == 0, f"{result.output}\n{mesh.logs()}"
    for target in (f"grpc://{mesh.gateway}", f"http://{mesh.http}"):
        assert result.stdout.count(target) == 2, f"one summary row per level of {target}:\n{result.stdout}"


def test_the_json_report_holds_every_figure_and_the_settings(run, mesh):
    document = json.loads((run[1] / "bench.json").read_text())
    assert {"format", "started_at", "finished_at", "command", "config", "versions", "targets"} <= document.keys()
    assert document["config"]["dataset"]["output_tokens"] == OUTPUT_TOKENS and not document["config"]["api_key_set"]
    assert document["versions"]["moemesh"] and document["versions"]["grpcio"]
    assert [t["target"] for t in document["targets"]] == [f"grpc://{mesh.gateway}", f"http://{mesh.http}"]
    for target in document["targets"]:
        assert target["model"] == "demo-moe" and target["error"] is None and target["warmup_errors"] == {}
        assert [level["label"] for level in target["levels"]] == ["c=1", "c=4"]
        for level in target["levels"]:
            where = f"{target['target']} {level['label']}"
            assert LEVEL_FIELDS <= level.keys(), f"{where}: missing {LEVEL_FIELDS - level.keys()}"
            assert (level["completed"], level["failed"], level["errors"]) == (REQUESTS, 0, {}), where
            assert level["total_output_tokens"] == REQUESTS * OUTPUT_TOKENS, f"{where}: ignore_eos fixes the length"
            assert level["mean_prompt_tokens"] == PROMPT_TOKENS, f"{where}: the tokenizer fixes the prompt length"
            assert level["goodput"] == pytest.approx(level["request_throughput"]), f"{where}: limits of a minute"
            assert level["output_throughput"] > 0 and level["request_throughput"] > 0
            for name in LATENCIES:
                stats = level[name]
                assert stats["count"] > 0 and 0 <= stats["p50"] <= stats["p90"] <= stats["p99"], f"{where} {name}"


def test_the_figure_is_written(run):
    png = (run[1] / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_requests_to_a_closed_port_are_errors_by_status_and_the_exit_code_says_so(tmp_path):
    port = free_port()
    report = tmp_path / "errors.json"
    result = bench("--target", f"grpc://127.0.0.1:{port}", "--target", f"http://127.0.0.1:{port}",
                   "--model", "demo-moe", "--requests", "3", "--warmup", "0", "--concurrency", "2",
                   "--json", str(report))
    assert result.exit_code == 1, result.output
    errors = [t["levels"][0]["errors"] for t in json.loads(report.read_text())["targets"]]
    assert [{kind: e["count"] for kind, e in found.items()} for found in errors] == [
        {"UNAVAILABLE": 3}, {"ConnectError": 3}]
    assert "UNAVAILABLE x3" in result.stderr and "ConnectError x3" in result.stderr


def test_a_target_whose_models_cannot_be_listed_is_reported_as_not_measured():
    result = bench("--target", f"grpc://127.0.0.1:{free_port()}", "--requests", "1")
    assert result.exit_code == 1
    assert "not measured" in result.stdout and "UNAVAILABLE: ListModels failed" in result.stderr
