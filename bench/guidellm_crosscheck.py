"""`moemesh bench` against guidellm on the same load, as a cross-check of the figures.

Starts `moemesh up --model M` (defaults; M is the ~100M benchmark Mixtral that `bench.engine_bench` builds),
then alternates, `--repeats` times, the same load from both tools: `--streams` concurrent streamed completions
over the OpenAI-compatible HTTP API, 160-token prompts (exact, with the checkpoint's tokenizer), 128 output
tokens, `--requests` requests. guidellm runs unmodified (it probes `GET /health` first) from its own
environment, given with `--guidellm PATH` (e.g. a virtual environment made with `pip install guidellm`).
Prints each run's output tokens/s, TTFT p50 and inter-token p50 from both tools. Usage:

    python -m bench.guidellm_crosscheck --guidellm /path/to/venv/bin/guidellm [--streams 16] [--requests 48]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

from bench.engine_bench import build_checkpoint
from moemesh.local import start_mesh, stop_mesh


def run_moemesh_bench(http: str, ckpt: pathlib.Path, streams: int, requests: int, out: pathlib.Path,
                      seed: int) -> dict:
    """As guidellm runs it: no warm-up, prompts never sent before (a new seed: no prefix-cache hits)."""
    subprocess.run([sys.executable, "-m", "moemesh.cli", "bench", "--target", f"http://{http}",
                    "--concurrency", str(streams), "--requests", str(requests), "--prompt-tokens", "160",
                    "--output-tokens", "128", "--tokenizer", str(ckpt), "--json", str(out), "--warmup", "0",
                    "--seed", str(seed)],
                   check=True, capture_output=True, text=True, timeout=1800)
    level = json.loads(out.read_text())["targets"][0]["levels"][0]
    return {"tok/s": level["output_throughput"], "ttft_p50_ms": level["ttft_ms"]["p50"],
            "itl_p50_ms": level["itl_ms"]["p50"]}


def run_guidellm(guidellm: str, http: str, ckpt: pathlib.Path, streams: int, requests: int,
                 workdir: pathlib.Path) -> dict:
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": f"http://{http}", "request_format": "/v1/completions"},
        "profile": {"kind": "concurrent", "streams": streams},
        "data": [{"kind": "synthetic_text", "prompt_tokens": 160, "output_tokens": 128}],
        "constraints": [{"kind": "max_requests", "count": requests}]}}
    (workdir / "scenario.json").write_text(json.dumps(scenario))
    out = workdir / "guidellm.json"
    # guidellm loads the tokenizer named like the served model (the checkpoint's directory name): from its parent
    # directory it finds it locally, with no model hub.
    subprocess.run([guidellm, "run", "--scenario", str(workdir / "scenario.json"), "--output",
                    f"kind=json,path={out}", "--disable-console"],
                   cwd=ckpt.parent, check=True, capture_output=True, text=True, timeout=1800)
    metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]

    def median(name: str) -> float:
        return metrics[name]["successful"]["median"]

    return {"tok/s": metrics["output_tokens_per_second"]["successful"]["mean"],
            "ttft_p50_ms": median("time_to_first_token_ms"), "itl_p50_ms": median("inter_token_latency_ms")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidellm", required=True, help="the guidellm executable")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()
    ckpt = build_checkpoint(args.workdir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        mesh = start_mesh(tmp, "--no-embeddings", "--model", str(ckpt), quiet=True)
        try:
            for i in range(args.repeats):
                ours = run_moemesh_bench(mesh.http, ckpt, args.streams, args.requests, tmp / f"bench{i}.json",
                                         seed=1000 + i)
                print(f"moemesh bench  run {i + 1}: {json.dumps(ours)}", flush=True)
                theirs = run_guidellm(args.guidellm, mesh.http, ckpt, args.streams, args.requests, tmp)
                print(f"guidellm       run {i + 1}: {json.dumps(theirs)}", flush=True)
        finally:
            stop_mesh(mesh)


if __name__ == "__main__":
    main()
