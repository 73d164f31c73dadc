"""What structured outputs cost: JSON-schema requests against free ones, and a new schema's first token.

On the ~100M-parameter benchmark Mixtral (`bench.engine_bench` builds it), in one run:

  1. the engine in-process: 32 concurrent free requests against the same 32
     prompts each constrained by a JSON schema (greedy, 128 new tokens at most),
     contenders alternating, each keeping its best run; output tokens per second
     and their ratio (target: the constrained batch costs at most 10%);
  2. the mesh (`moemesh up` on its defaults), driven over gRPC by this process
     as an external client: the same two loads of 32 concurrent streams; and
     the time to first token of a request whose schema the mesh has not seen
     (compiled on its worker) against one whose schema is cached.

Greedy decoding ignores EOS; a constrained output ends where its grammar does,
so tokens per second (not requests) is the figure compared. Usage:

    python -m bench.structured_bench [--concurrency 32] [--new-tokens 128] [--repeats 2] [--skip-mesh]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import tempfile
import time
import uuid

import grpc
import torch

from bench.engine_bench import BENCH_CONFIG, build_checkpoint, prompts
from moemesh.local import start_mesh, stop_mesh
from moemesh.services.core.structured import grammar_of
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model

# An ERP-style extraction: an invoice with its lines. Strings are unbounded, so a random model's answers run
# to max_tokens like free ones do: the two loads generate about the same number of tokens.
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "number": {"type": "string"},
        "date": {"type": "string", "format": "date"},
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vat_id": {"type": "string"}},
                     "required": ["name"]},
        "lines": {"type": "array", "items": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                           "unit_price": {"type": "number", "minimum": 0}},
            "required": ["sku", "quantity", "unit_price"]}},
        "total": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
    },
    "required": ["number", "date", "customer", "lines", "total", "currency"],
}


def structured(schema: dict) -> common_pb2.StructuredOutput:
    return common_pb2.StructuredOutput(json_schema=json.dumps(schema))


# ---- 1. the engine in-process --------------------------------------------------------------------------------
def run_engine(engine: Engine, batch: list[list[int]], new_tokens: int, grammar) -> float:
    """Output tokens/s of the batch submitted at once, each request constrained by `grammar` (None: free)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.add(GenerationRequest(f"r{i}", tuple(prompt), params, grammar=grammar))
    generated = 0
    while engine.has_work():
        generated += sum(len(o.token_ids) for o in engine.step())
    return generated / (time.perf_counter() - start)


def bench_engine(ckpt: pathlib.Path, concurrency: int, new_tokens: int, repeats: int) -> None:
    model = build_model(open_checkpoint(ckpt), dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(ckpt)
    batch = prompts(concurrency, 100, BENCH_CONFIG["vocab_size"])
    engine = Engine(model, tokenizer, max_num_seqs=concurrency, max_model_len=100 + new_tokens + 8)
    grammar = engine.grammars.compile(grammar_of(structured(INVOICE_SCHEMA)))
    run_engine(engine, batch[:2], 8, None)  # warm-up
    run_engine(engine, batch[:2], 8, grammar)
    free_runs, constrained_runs = [], []
    for _ in range(repeats):  # alternating; each keeps its best (shared, noisy machines)
        free_runs.append(run_engine(engine, batch, new_tokens, None))
        constrained_runs.append(run_engine(engine, batch, new_tokens, grammar))
    free, constrained = max(free_runs), max(constrained_runs)
    print(f"engine, {concurrency} concurrent, free:        {free:8.1f} tok/s  (runs: {_fmt(free_runs)})")
    print(f"engine, {concurrency} concurrent, JSON schema: {constrained:8.1f} tok/s  (runs: {_fmt(constrained_runs)})")
    print(f"engine: structured / free = {constrained / free:.3f}  (target >= 0.90)")


# ---- 2. the mesh, from an external gRPC client -----------------------------------------------------------------
async def stream(stub, prompt: str, new_tokens: int, spec: common_pb2.StructuredOutput | None) -> tuple[float, int]:
    """One streamed generation: (seconds to its first token, tokens)."""
    sampling = common_pb2.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    if spec is not None:
        sampling.structured.CopyFrom(spec)
    request = generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=prompt), sampling=sampling,
                                             cache_mode=common_pb2.CACHE_MODE_NO_STORE)
    start, first, tokens = time.perf_counter(), None, 0
    async for event in stub.Generate(request, timeout=600):
        if event.token_ids and first is None:
            first = time.perf_counter() - start
        tokens += len(event.token_ids)
    return first, tokens


async def mesh_load(address: str, concurrency: int, new_tokens: int,
                    spec: common_pb2.StructuredOutput | None) -> float:
    """Output tokens/s of `concurrency` concurrent streams."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        start = time.perf_counter()
        results = await asyncio.gather(*[stream(stub, f"Invoice {i}: extract the fields.", new_tokens, spec)
                                         for i in range(concurrency)])
        return sum(tokens for _, tokens in results) / (time.perf_counter() - start)


async def first_tokens(address: str, samples: int) -> tuple[list[float], list[float]]:
    """Time to first token, idle mesh: of a schema never seen (each sample a new one) and of a cached one."""
    new, cached = [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        known = structured(INVOICE_SCHEMA)
        await stream(stub, "warm", 2, known)
        for _ in range(samples):
            fresh = dict(INVOICE_SCHEMA, properties={**INVOICE_SCHEMA["properties"],
                                                     f"field_{uuid.uuid4().hex[:8]}": {"type": "string"}})
            new.append((await stream(stub, "Invoice: extract the fields.", 2, structured(fresh)))[0])
            cached.append((await stream(stub, "Invoice: extract the fields.", 2, known))[0])
    return new, cached


def bench_mesh(ckpt: pathlib.Path, concurrency: int, new_tokens: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mesh = start_mesh(pathlib.Path(tmp), "--no-http", "--no-embeddings", "--model", str(ckpt), quiet=True)
        try:
            asyncio.run(mesh_load(mesh.gateway, 4, 8, None))  # warm-up
            free_runs, constrained_runs = [], []
            for _ in range(repeats):
                free_runs.append(asyncio.run(mesh_load(mesh.gateway, concurrency, new_tokens, None)))
                constrained_runs.append(asyncio.run(mesh_load(mesh.gateway, concurrency, new_tokens,
                                                              structured(INVOICE_SCHEMA))))
            new, cached = asyncio.run(first_tokens(mesh.gateway, 5))
        finally:
            stop_mesh(mesh)
    free, constrained = max(free_runs), max(constrained_runs)
    print(f"mesh (defaults), {concurrency} streams, free:        {free:8.1f} tok/s  (runs: {_fmt(free_runs)})")
    print(f"mesh (defaults), {concurrency} streams, JSON schema: {constrained:8.1f} tok/s  "
          f"(runs: {_fmt(constrained_runs)})")
    print(f"mesh: structured / free = {constrained / free:.3f}  (target >= 0.90)")
    print(f"mesh, time to first token, idle: new schema p50 {1000 * statistics.median(new):.1f} ms, "
          f"cached schema p50 {1000 * statistics.median(cached):.1f} ms  (5 each)")


def _fmt(runs: list[float]) -> str:
    return ", ".join(f"{r:.0f}" for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-mesh", action="store_true")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()
    ckpt = build_checkpoint(args.workdir)
    print(f"checkpoint {ckpt}, {torch.get_num_threads()} threads")
    bench_engine(ckpt, args.concurrency, args.new_tokens, args.repeats)
    if not args.skip_mesh:
        bench_mesh(ckpt, args.concurrency, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
