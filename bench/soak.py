"""A soak: the mesh on its defaults under steady load for `--minutes`, with every service's resident memory.

Starts `moemesh up --model M` (M: the ~100M benchmark Mixtral; `--model demo` for the demo model) and
runs `moemesh bench` against its OpenAI-compatible HTTP API from another process: `--concurrency` streams,
160-token prompts, 128 output tokens, for `--minutes`. Every 15 s it samples the resident memory (VmRSS) of
the gateway, the scheduler, each worker and Redis. It prints, per service, the first sample after the
warm-up, the largest and the last, then the bench's summary (errors by status). Usage:

    python -m bench.soak [--minutes 10] [--concurrency 16] [--model DIR|demo]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from bench.engine_bench import bench_model
from moemesh.local import RunningMesh, start_mesh, stop_mesh

SAMPLE_SECONDS = 15


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process in MiB (None once it is gone)."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def services(mesh: RunningMesh) -> dict[str, int]:
    """Service name -> pid, Redis included (the embedded server is the supervisor's child)."""
    pids = {"gateway": mesh.ready["gateway"]["pid"], "scheduler": mesh.ready["scheduler"]["pid"]}
    pids |= {f"worker{i}": w["pid"] for i, w in enumerate(mesh.ready["workers"])}
    redis = subprocess.run(["pgrep", "-P", str(mesh.process.pid), "redis-server"], capture_output=True, text=True)
    if redis.stdout.split():
        pids["redis"] = int(redis.stdout.split()[0])
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--model", default="", help="checkpoint directory, or 'demo' [default: the benchmark Mixtral]")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()
    model = bench_model(args.model, args.workdir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        mesh = start_mesh(tmp, "--no-embeddings", "--model", str(model), quiet=True)
        try:
            pids = services(mesh)
            bench = subprocess.Popen(
                [sys.executable, "-m", "moemesh.cli", "bench", "--target", f"http://{mesh.http}", "--concurrency",
                 str(args.concurrency), "--duration", str(args.minutes * 60), "--prompt-tokens", "160",
                 "--output-tokens", "128", "--tokenizer", str(model), "--json", str(tmp / "soak.json")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            samples: dict[str, list[float]] = {name: [] for name in pids}
            while bench.poll() is None:
                time.sleep(SAMPLE_SECONDS)
                for name, pid in pids.items():
                    value = rss_mib(pid)
                    if value is not None:
                        samples[name].append(value)
            output = bench.communicate()[0]
            report = json.loads((tmp / "soak.json").read_text()) if (tmp / "soak.json").exists() else None
        finally:
            stop_mesh(mesh)
    print(f"soak: {args.minutes:g} min, {args.concurrency} streams, 160 + 128 tokens, model {model.name}")
    print(f"{'service':<10} {'RSS MiB after warm-up':>22} {'max':>8} {'last':>8}")
    for name, values in samples.items():
        if values:
            print(f"{name:<10} {values[min(1, len(values) - 1)]:>22.0f} {max(values):>8.0f} {values[-1]:>8.0f}")
    if report is not None:
        level = report["targets"][0]["levels"][0]
        print(f"completed {level['completed']}, failed {level['failed']}, errors {level['errors'] or 'none'}; "
              f"{level['output_throughput']:.1f} output tok/s; TTFT p50 {level['ttft_ms']['p50']:.0f} ms, "
              f"ITL p50 {level['itl_ms']['p50']:.1f} ms")
    else:
        print(output[-3000:])


if __name__ == "__main__":
    main()
