"""What another process on the worker's cores costs a decode step: the engine alone against the engine beside a
competitor, in alternating rounds of one run.

A worker shares its cores with the gateway, the scheduler, gRPC's threads
and often the client: processes that wake many times a step for a fraction
of a millisecond, or once a step for longer. Each round times --steps
decode steps of --seqs sequences (the ~100M benchmark Mixtral, sized as a
worker sizes itself) alone, then beside a process that wakes every --period
seconds and computes for --burst seconds, for each competitor given. It
prints each pattern's step time against the steps alone.

    python -m bench.contention_bench [--rounds 6] [--competitors 0.0001:0.0016,0.015:0.065]

`--library PATH` adds a second build of the native kernels as a contender
(for instance the sources of an earlier commit built with the same flags):
every round then runs each library alone and beside each competitor.
"""

from __future__ import annotations

import argparse
import ctypes
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from bench.mesh_vs_engine import build_checkpoint, default_engine, word_prompts
from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.ops import native

COMPETITOR = r'''
import sys, time
burst, period = float(sys.argv[1]), float(sys.argv[2])
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < burst:
        pass
    time.sleep(max(period - burst, 0.0))
'''


def decoding_engine(seqs: int):
    """The benchmark engine with `seqs` sequences prefilled and decoding (they never finish)."""
    engine = default_engine(build_checkpoint(pathlib.Path(tempfile.gettempdir()) / "moemesh-bench"))
    params = SamplingParams(max_tokens=1 << 30, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(word_prompts(seqs, 100, seed=7)):
        engine.add(GenerationRequest(f"c{i}", tuple(engine.tokenizer.encode(prompt)), params))
    while engine.waiting or any(s.num_computed < len(s.token_ids) - 1 for s in engine.running):
        engine.step()
    return engine


def median_step(engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12, help="decode steps timed per contender and round")
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--competitors", default="0.0001:0.0016,0.015:0.065",
                        help="burst:period pairs, seconds: what the other process computes and how often")
    parser.add_argument("--library", type=pathlib.Path, help="another build of the native kernels to compare")
    args = parser.parse_args()
    patterns = [tuple(float(v) for v in pair.split(":")) for pair in args.competitors.split(",")]
    libraries = {"kernels": native.load_kernels()}
    if not libraries["kernels"].available:
        sys.exit(f"the native kernels are not available here: {libraries['kernels'].reason}")
    if args.library:
        other = ctypes.CDLL(str(args.library))
        native._declare(other)
        libraries[args.library.name] = native.Kernels(other)
    engine = decoding_engine(args.seqs)
    loaded = native.load_kernels
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for pattern in [None, *patterns]:
                label = "alone" if pattern is None else f"{pattern[0] * 1e3:g} ms every {pattern[1] * 1e3:g} ms"
                competitor = None
                if pattern is not None:
                    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(pattern[0]), str(pattern[1])])
                    time.sleep(0.3)
                try:
                    for _ in range(2):  # each library twice, interleaved
                        for name, kernels in libraries.items():
                            native.load_kernels = lambda kernels=kernels: kernels
                            times.setdefault((name, label), []).append(median_step(engine, args.steps))
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
    finally:
        native.load_kernels = loaded
    print(f"{args.seqs}-sequence decode steps, median of {args.steps} per sample, {args.rounds} rounds")
    for name in libraries:
        alone = statistics.median(times[(name, "alone")])
        print(f"{name}: alone {alone * 1e3:.1f} ms")
        for (lib, label), samples in times.items():
            if lib == name and label != "alone":
                step = statistics.median(samples)
                print(f"  beside {label}: {step * 1e3:.1f} ms ({step / alone - 1:+.1%})")


if __name__ == "__main__":
    main()
