"""The ``moemesh`` command: run a local mesh and call it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import re
import signal
import sys
import tempfile
import time

import click
import grpc

from moemesh.v1 import (
    common_pb2,
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")  # worker.server.config's, without importing the worker here


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--device as the workers take it, checked before any process starts."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise click.BadParameter(f'{value!r}: expected "cpu" or "cuda[:N]"')
    return value


def demo_model_dir() -> pathlib.Path:
    """The small demo MoE checkpoint that ships with moemesh."""
    return pathlib.Path(__file__).resolve().parent.parent / "worker" / "demo" / "demo-moe"


def _check_placement(model_dir: pathlib.Path, ep_size: int, ep_placement: str | None) -> None:
    """--ep-size and --ep-placement against the checkpoint's experts, before any process starts: a map that does not
    fit the model (or more ranks than experts) is one line here, not a shard that dies after the mesh started."""
    from moemesh.worker.models.checkpoint import open_checkpoint  # the worker's code: only for --ep-size > 1
    from moemesh.worker.server.shard import parse_placement

    try:
        parse_placement(open_checkpoint(model_dir), ep_placement, ep_size)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
@click.version_option(package_name="moemesh")
def main() -> None:
    """moemesh: serve Mixture-of-Experts language models as a gRPC mesh."""


def _tls_dir(requested: pathlib.Path | None) -> pathlib.Path:
    """The certificates for `up --tls`: those in `requested`, made there if missing, else a fresh temporary set."""
    from moemesh.services.core.tls import make_certificates

    directory = requested or pathlib.Path(tempfile.mkdtemp(prefix="moemesh-tls-"))
    if not (directory / "ca.crt").is_file():
        make_certificates(directory)
    return directory.resolve()


# ---- certs ------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=pathlib.Path), default=pathlib.Path("certs"),
              show_default=True, help="directory to write ca.crt and <role>.crt / <role>.key into")
@click.option("--host", "hosts", multiple=True, default=("localhost", "127.0.0.1"), show_default=True,
              help="name or IP the certificates are valid for (repeat)")
def certs(out, hosts) -> None:
    """Make a private CA and certificates for mutual TLS between the mesh's services."""
    from moemesh.services.core.tls import ROLES, make_certificates

    make_certificates(out, tuple(hosts))
    click.echo(f"wrote {out}/ca.crt and {', '.join(f'{r}.crt/.key' for r in ROLES)}; "
               f"start the services with --tls-dir {out} (or: moemesh up --tls --tls-dir {out})")


# ---- up ---------------------------------------------------------------------
@main.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              help="Hugging Face MoE checkpoint directory [default: the bundled demo model]")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="worker processes (replicas of the model)")
@click.option("--ep-size", type=click.IntRange(1, 64), default=1, show_default=True,
              help="processes per replica: with N > 1 each replica is rank 0 (engine, attention, routers) and N-1 "
                   "expert shards, the routed experts spread over all N")
@click.option("--ep-placement", help='with --ep-size: expert -> rank map, "contiguous" (default), "0,0,1,1" or JSON '
                                     '{"experts": [...], "layers": {"3": [...]}}')
@click.option("--port", type=click.IntRange(0, 65535), default=50051, show_default=True,
              help="gateway gRPC port (0 = any free port)")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="gateway HTTP port (0 = any free port)")
@click.option("--no-http", is_flag=True, help="do not serve the HTTP API")
@click.option("--redis-url", envvar="REDIS_URL", help="use this Redis instead of the embedded one [env REDIS_URL]")
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              help="serve the all-MiniLM-L6-v2 embedding model on each worker")
@click.option("--device", default="cpu", show_default=True, callback=_device, help='"cpu" or "cuda[:N]"')
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto = bf16 on CUDA, fp32 on CPU")
@click.option("--max-num-seqs", type=click.IntRange(1, 4096), default=None,
              help="sequences per engine step, per worker [default: sized from the worker's KV pool]")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="once every service is healthy, write their addresses and pids here (JSON)")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="write each service's log to DIR/<service>.log instead of this terminal")
@click.option("--tls", is_flag=True, help="mutual TLS between the services, with certificates made for this run")
@click.option("--tls-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="with --tls: use (or create) the certificates in DIR [default: a temporary directory]")
def up(model_dir, workers, ep_size, ep_placement, port, http_port, no_http, redis_url, embeddings, device, dtype,
       max_num_seqs, ready_file, log_dir, tls, tls_dir) -> None:
    """Start Redis, the scheduler, workers and the gateway on this machine."""
    from moemesh.supervisor import MeshOptions, MeshSecrets

    try:
        credentials = MeshSecrets.for_this_run(os.environ)  # MOEMESH_CLUSTER_TOKEN / MOEMESH_KV_TIER_SECRET or fresh
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    embedding_dir = None
    if embeddings:
        from moemesh.worker.embeddings.sentence import default_embedding_model_dir

        embedding_dir = default_embedding_model_dir()
    if ep_placement and ep_size == 1:
        raise click.UsageError("--ep-placement needs --ep-size of 2 or more")
    model_dir = (model_dir or demo_model_dir()).resolve()
    if ep_size > 1:
        _check_placement(model_dir, ep_size, ep_placement)
    options = MeshOptions(
        model_dir=model_dir, workers=workers, port=port,
        http_port=None if no_http else http_port, redis_url=redis_url, embedding_model_dir=embedding_dir,
        device=device, dtype=dtype, max_num_seqs=max_num_seqs,
        threads_per_worker=max(1, (os.cpu_count() or 1) // (workers * ep_size)), log_dir=log_dir,
        tls_dir=_tls_dir(tls_dir) if tls else None, ep_size=ep_size, ep_placement=ep_placement,
    )
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(asyncio.run(_run_mesh(options, ready_file, credentials)))


async def _run_mesh(options, ready_file: pathlib.Path | None, credentials) -> int:
    from moemesh.supervisor import Mesh, ServiceFailed

    publish = (lambda ready: _write_ready_file(ready_file, ready)) if ready_file is not None else None
    # publish: the ready file follows restarts (new pids, a restarted worker's address)
    mesh = Mesh(options, credentials=credentials, publish=publish)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(mesh.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 130
        ready = starting.result()
        if publish is not None:
            publish(ready)
        _print_banner(ready)
        # Children that exit are restarted; only a signal, or a child in a crash loop (ServiceFailed), ends this.
        supervising = asyncio.create_task(mesh.supervise())
        await asyncio.wait({supervising, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if supervising.done():
            supervising.result()
        supervising.cancel()
        await asyncio.gather(supervising, return_exceptions=True)
        return 0
    except ServiceFailed as exc:
        click.echo(f"moemesh: {exc}", err=True)
        return 1
    finally:
        click.echo("moemesh: stopping…", err=True)
        await mesh.stop()
        if ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                ready_file.unlink()


def _write_ready_file(path: pathlib.Path, ready: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(ready, indent=2))
    tmp.replace(path)  # readers never see a half-written file


def _print_banner(ready: dict) -> None:
    gateway = ready["gateway"]
    lines = [
        "moemesh is up.",
        f"  gateway gRPC   {gateway['address']}",
        *([f"  gateway HTTP   http://{gateway['http_address']}"] if gateway.get("http_address") else []),
        f"  scheduler      {ready['scheduler']['address']}",
        *[f"  worker         {w['address']}  model={w.get('model')}  "
          f"KV {w.get('kv_tokens', 0):,} tokens, {w.get('max_num_seqs', 0)} sequences, "
          f"{w.get('max_num_batched_tokens', 0):,} tokens a step" for w in ready["workers"]],
        *[f"  expert shard   {s['address']}  {s.get('replica_group')} rank {s.get('rank')}"
          for s in ready.get("shards", [])],
        f"  redis          {ready['redis']['url']}",
        *(["  metrics        " + "  ".join(f"{name}=http://{address}/metrics" for name, address in metrics)]
          if (metrics := _metrics_addresses(ready)) else []),
        "",
        "Try:",
        f"  moemesh generate --target {gateway['address']} \"def fibonacci(n):\"",
        f"  moemesh embed --target {gateway['address']} \"hello world\"",
        f"  grpcurl -plaintext {gateway['address']} list",
        "Press Ctrl-C to stop.",
    ]
    click.echo("\n".join(lines), err=True)


def _metrics_addresses(ready: dict) -> list[tuple[str, str]]:
    """(service, host:port) of every Prometheus endpoint in a ready file."""
    services = [("gateway", ready["gateway"]), ("scheduler", ready["scheduler"]),
                *[(f"worker-{i}", w) for i, w in enumerate(ready["workers"])]]
    return [(name, info["metrics_address"]) for name, info in services if info and info.get("metrics_address")]


# ---- ray up -----------------------------------------------------------------
@main.group("ray")
def ray_group() -> None:
    """Run the mesh on a Ray cluster (pip install 'moemesh[ray]')."""


@ray_group.command("up")
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join [env RAY_ADDRESS; default: the cluster "
                                                      "this machine runs (`ray start`), else a new local one]")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              help="checkpoint directory, at this path on every node [default: the bundled demo model]")
@click.option("--workers", type=click.IntRange(1, 1024), default=1, show_default=True, help="replicas of the model")
@click.option("--ep-size", type=click.IntRange(1, 64), default=1, show_default=True,
              help="processes per replica (one placement group bundle each)")
@click.option("--strategy", type=click.Choice(["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]), default="PACK",
              show_default=True, help="placement of each replica's ranks: together (PACK) or over nodes (SPREAD)")
@click.option("--cpus-per-rank", type=click.FloatRange(min=0.1), default=1.0, show_default=True)
@click.option("--gpus-per-rank", type=click.FloatRange(min=0), help="[default: 1 when the cluster has GPUs, else 0]")
@click.option("--max-restarts", type=click.IntRange(-1), default=20, show_default=True,
              help="times Ray restarts an actor whose service or node died (-1: forever)")
@click.option("--port", type=click.IntRange(0, 65535), default=50051, show_default=True, help="gateway gRPC port")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="gateway HTTP port")
@click.option("--no-http", is_flag=True, help="do not serve the HTTP API")
@click.option("--scheduler-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="0 = a free port (kept across the scheduler's restarts)")
@click.option("--redis-url", envvar="REDIS_URL", help="use this Redis [env REDIS_URL; default: a redis-server actor "
                                                      "with a fresh password]")
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              help="serve the all-MiniLM-L6-v2 embedding model on each worker")
@click.option("--device", default="auto", show_default=True, help='"auto" (cuda where the bundle has a GPU), "cpu", '
                                                                  '"cuda"')
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True)
@click.option("--max-num-seqs", type=click.IntRange(1, 4096), default=None)
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="each service's log as DIR/<service>.log on its node [default: Ray's worker logs]")
@click.option("--tls-dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              help="mutual TLS between the services: certificates from `moemesh certs`, at this path on every node")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="once every service is ready, write their addresses here (JSON)")
def ray_up(address, model_dir, workers, ep_size, strategy, cpus_per_rank, gpus_per_rank, max_restarts, port,
           http_port, no_http, scheduler_port, redis_url, embeddings, device, dtype, max_num_seqs, log_dir, tls_dir,
           ready_file) -> None:
    """Place the scheduler, gateway and worker replicas on a Ray cluster as actors; block until Ctrl-C."""
    from moemesh.supervisor import MeshSecrets

    try:
        from moemesh.ray_mesh import RayMeshOptions, serve
    except ImportError as exc:
        raise click.UsageError(f"{exc}: install Ray with pip install 'moemesh[ray]'") from None
    model_dir = (model_dir or demo_model_dir()).resolve()
    if ep_size > 1:
        _check_placement(model_dir, ep_size, None)
    try:
        credentials = MeshSecrets.for_this_run(os.environ)  # MOEMESH_CLUSTER_TOKEN / MOEMESH_KV_TIER_SECRET or fresh
        embedding_dir = None
        if embeddings:
            from moemesh.worker.embeddings.sentence import default_embedding_model_dir

            embedding_dir = default_embedding_model_dir()
        options = RayMeshOptions(
            model_dir=model_dir, workers=workers, ep_size=ep_size, embedding_model_dir=embedding_dir,
            redis_url=redis_url, port=port, http_port=None if no_http else http_port,
            scheduler_port=scheduler_port, device=device, dtype=dtype, max_num_seqs=max_num_seqs,
            cpus_per_rank=cpus_per_rank, gpus_per_rank=gpus_per_rank, strategy=strategy, max_restarts=max_restarts,
            log_dir=log_dir.resolve() if log_dir else None, tls_dir=tls_dir.resolve() if tls_dir else None)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    def on_ready(ready: dict) -> None:
        if ready_file is not None:
            _write_ready_file(ready_file, ready)
        _print_banner(ready)

    sys.exit(serve(options, credentials, address=address, on_ready=on_ready))


# ---- hash-key ---------------------------------------------------------------
@main.command("hash-key")
@click.argument("key", required=False)
@click.option("--salt", help="use this salt instead of a fresh random one (e.g. the tenants file's `salt`)")
@click.option("--generate", is_flag=True, help="make a new random key; print it, then its hash line")
def hash_key(key, salt, generate) -> None:
    """Print the salted hash of an API key for a tenants file's `api_key_hashes`.

    KEY may be omitted: it is then read from a hidden prompt (or stdin), so it stays out of shell history.
    The output line, `sha256$<salt>$<hex digest>`, is what goes into the file; the key itself never does.
    """
    from moemesh.gateway.tenants import hash_line, new_key

    if generate:
        if key:
            raise click.UsageError("give KEY or --generate, not both")
        key = new_key()
        click.echo(f"key: {key}", err=True)
    elif not key:
        key = click.prompt("API key", hide_input=True, err=True).strip()
    if not key:
        raise click.UsageError("the key is empty")
    try:
        click.echo(hash_line(key, salt))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


# ---- clients ----------------------------------------------------------------
def _channel(target: str, tls: bool = False, tls_ca: pathlib.Path | None = None) -> grpc.Channel:
    """A channel to the gateway (or Envoy in front of it): TLS with the system's roots or `tls_ca` when asked."""
    if tls or tls_ca:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca.read_bytes() if tls_ca else None))
    return grpc.insecure_channel(target)


def client_options(command):
    """--api-key (or MOEMESH_API_KEY) and the TLS options of a client command."""
    command = click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
                           help="TLS, trusting this CA certificate (PEM)")(command)
    command = click.option("--tls", is_flag=True, help="TLS with the system's trusted roots (e.g. Envoy at the edge)")(
        command)
    return click.option("--api-key", envvar="MOEMESH_API_KEY",
                        help="sent as `authorization: Bearer` [env MOEMESH_API_KEY]")(command)


def _auth(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _fail(exc: grpc.RpcError) -> None:
    click.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
    sys.exit(1)


@main.command()
@click.argument("prompt")
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help="gateway host:port")
@click.option("--model", default="", help="model id [default: the gateway's default]")
@click.option("--chat", is_flag=True, help="send PROMPT as a user chat message")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, help="0 = greedy [default: the model's generation_config]")
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--seed", type=int)
@click.option("--stop", multiple=True, help="stop sequence (repeatable)")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="deadline, seconds")
@click.option("--json", "as_json", is_flag=True, help="print each stream event as JSON")
@client_options
def generate(prompt, target, model, chat, max_tokens, temperature, top_p, top_k, seed, stop, timeout,
             as_json, api_key, tls, tls_ca) -> None:
    """Stream a completion of PROMPT from the gateway."""
    from google.protobuf import json_format

    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, stop=stop)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    if chat:
        prompt_pb = common_pb2.Prompt(chat=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="user", content=prompt)]))
    else:
        prompt_pb = common_pb2.Prompt(text=prompt)
    request = generation_pb2.GenerateRequest(model=model, prompt=prompt_pb, sampling=sampling)
    with _channel(target, tls, tls_ca) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            last = None
            for event in stub.Generate(request, timeout=timeout, metadata=_auth(api_key)):
                if as_json:
                    click.echo(json_format.MessageToJson(event, indent=None))
                else:
                    click.echo(event.text, nl=False)
                last = event
        except grpc.RpcError as exc:
            _fail(exc)
    if last is not None and not as_json:
        usage = last.usage
        click.echo(f"\n[{common_pb2.FinishReason.Name(last.finish_reason)} prompt_tokens={usage.prompt_tokens} "
                   f"completion_tokens={usage.completion_tokens} ttft={last.timings.time_to_first_token * 1000:.1f}ms]",
                   err=True)


@main.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help="gateway host:port")
@click.option("--model", default="", help="embedding model id [default: the gateway's default]")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@client_options
def embed(texts, target, model, timeout, api_key, tls, tls_ca) -> None:
    """Print the embedding vector of each TEXT (one JSON object per line)."""
    with _channel(target, tls, tls_ca) as channel:
        stub = embeddings_pb2_grpc.EmbeddingsStub(channel)
        try:
            reply = stub.Embed(embeddings_pb2.EmbedRequest(model=model, inputs=texts), timeout=timeout,
                               metadata=_auth(api_key))
        except grpc.RpcError as exc:
            _fail(exc)
    for item in reply.embeddings:
        click.echo(json.dumps({"index": item.index, "model": reply.model, "dimensions": reply.dimensions,
                               "embedding": [round(v, 6) for v in item.values]}))


@main.command()
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help="gateway host:port")
@client_options
def models(target, api_key, tls, tls_ca) -> None:
    """List the models the mesh serves."""
    from google.protobuf import json_format

    with _channel(target, tls, tls_ca) as channel:
        try:
            reply = models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=10,
                                                                   metadata=_auth(api_key))
        except grpc.RpcError as exc:
            _fail(exc)
    click.echo(json_format.MessageToJson(reply))


@main.command()
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help="service host:port")
@click.option("--service", default="", help="service name [default: overall health]")
@client_options
def health(target, service, api_key, tls, tls_ca) -> None:
    """Print a service's health (grpc.health.v1); exit 1 unless SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(target, tls, tls_ca) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as exc:
            _fail(exc)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    click.echo(status)
    sys.exit(0 if status == "SERVING" else 1)


@main.command()
@click.option("--scheduler", "target", required=True, help="scheduler host:port")
@click.option("--tls-dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              help="mutual TLS: the mesh's certificates, dialled as the operator role (operator.crt/.key)")
def nodes(target, tls_dir) -> None:
    """List the scheduler's registered nodes (JSON), as an operator.

    The cluster token is read from the environment (MOEMESH_CLUSTER_TOKEN), never from a flag: a command line
    shows in `ps`.
    """
    from google.protobuf import json_format

    from moemesh.services.core.auth import bearer_metadata
    from moemesh.services.core.tls import channel_credentials
    from moemesh.v1 import scheduler_pb2, scheduler_pb2_grpc

    channel = (grpc.secure_channel(target, channel_credentials(tls_dir, "operator")) if tls_dir
               else grpc.insecure_channel(target))
    with channel:
        try:
            reply = scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(
                scheduler_pb2.ListNodesRequest(), metadata=bearer_metadata(os.environ.get("MOEMESH_CLUSTER_TOKEN")),
                timeout=10)
        except grpc.RpcError as exc:
            _fail(exc)
    click.echo(json_format.MessageToJson(reply))


@main.command()
@click.option("--ready-file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="read every address from the ready file of `moemesh up --ready-file`")
@click.option("--scheduler", help="scheduler host:port")
@click.option("--gateway", help="gateway host:port (the models it serves)")
@click.option("--scheduler-metrics", help="the scheduler's metrics host:port (queues)")
@click.option("--gateway-metrics", help="the gateway's metrics host:port (caches)")
@click.option("--tls-dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              help="mutual TLS to the scheduler as the operator role (operator.crt/.key)")
@click.option("--api-key", envvar="MOEMESH_API_KEY", help="the gateway's API key [env MOEMESH_API_KEY]")
@click.option("--watch", type=float, help="refresh every this many seconds until Ctrl-C")
def status(ready_file, scheduler, gateway, scheduler_metrics, gateway_metrics, tls_dir, api_key, watch) -> None:
    """The mesh at a glance: nodes, models, queues and caches.

    The scheduler is asked as an operator, with the cluster token from MOEMESH_CLUSTER_TOKEN (never a flag: a
    command line shows in `ps`) or the operator certificate.
    """
    from rich.console import Console
    from rich.live import Live

    from moemesh.status import Targets, read, render

    targets = Targets.from_ready_file(ready_file) if ready_file else Targets()
    for name, value in (("scheduler", scheduler), ("gateway", gateway), ("scheduler_metrics", scheduler_metrics),
                        ("gateway_metrics", gateway_metrics)):
        if value:
            setattr(targets, name, value)
    if not (targets.scheduler or targets.gateway):
        raise click.UsageError("give --ready-file, or --scheduler and/or --gateway")

    def look():
        return read(targets, cluster_token=os.environ.get("MOEMESH_CLUSTER_TOKEN"), api_key=api_key, tls_dir=tls_dir)

    console = Console()
    if watch is None:
        snapshot = look()
        console.print(render(snapshot))
        sys.exit(1 if snapshot.errors else 0)
    with Live(render(look()), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(render(look()), refresh=True)
        except KeyboardInterrupt:
            pass


# ---- bench ------------------------------------------------------------------
@main.command()
@click.option("--target", "targets", multiple=True, required=True,
              help="grpc://HOST:PORT (the mesh's gRPC API) or http://HOST:PORT (any OpenAI-compatible server); "
                   "repeat to measure several in turn")
@click.option("--model", help="model id [default: the first generation model the server lists]")
@click.option("--api-key", envvar="MOEMESH_API_KEY", help="sent as `authorization: Bearer` [env MOEMESH_API_KEY]")
@click.option("--concurrency", help="closed loop: requests in flight; a list sweeps, e.g. 1,8,32 [default: 8]")
@click.option("--rate", help="open loop: Poisson arrivals in requests/s; a list sweeps, e.g. 1,2,4")
@click.option("--requests", type=int, help="requests per level [default: 64, or unbounded with --duration]")
@click.option("--duration", type=float, help="seconds per level during which requests are sent")
@click.option("--warmup", type=int, default=2, show_default=True,
              help="requests sent (all at once) before a target's first level, left out of the figures")
@click.option("--prompt-tokens", type=int, default=256, show_default=True, help="synthetic prompts' length")
@click.option("--output-tokens", type=int, default=128, show_default=True,
              help="tokens generated per request (max_tokens with ignore_eos)")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              help="checkpoint directory with tokenizer.json: prompts of exactly --prompt-tokens tokens "
                   "[default: approximated from words]")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              help="prompts to send instead of synthetic ones: one per line, or JSONL with a \"prompt\" field")
@click.option("--shared-prefix-ratio", type=float, default=0.0, show_default=True,
              help="fraction of each synthetic prompt that is a prefix common to all (prefix caching)")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--seed", type=int, default=0, show_default=True, help="the dataset's, the arrivals' and sampling's")
@click.option("--allow-cache", is_flag=True, help="let requests use the mesh's response cache [default: bypass it]")
@click.option("--goodput", help="limits in ms for goodput, e.g. ttft:500,tpot:50 (keys ttft, tpot, e2e)")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="deadline of each request, seconds")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="write every figure, the settings and versions here")
@click.option("--png", "png_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="write a figure of throughput and latency percentiles against the load here")
def bench(targets, model, api_key, concurrency, rate, requests, duration, warmup, prompt_tokens, output_tokens,
          tokenizer, prompt_file, shared_prefix_ratio, temperature, seed, allow_cache, goodput, timeout, json_path,
          png_path) -> None:
    """Measure throughput and latency of a mesh (or any OpenAI-compatible server) under load.

    Exits 1 when any measured request failed (errors are listed by status), 0 otherwise.
    """
    from moemesh.loadgen import config as bench_config
    from moemesh.loadgen.main import prepare, run

    if concurrency and rate:
        raise click.UsageError("give --concurrency or --rate, not both")
    try:
        config = bench_config.BenchConfig(
            targets=tuple(bench_config.parse_target(t) for t in targets),
            levels=bench_config.parse_levels("rate", rate) if rate else
            bench_config.parse_levels("concurrency", concurrency or "8"),
            dataset=bench_config.DatasetConfig(
                prompt_tokens=prompt_tokens, output_tokens=output_tokens, shared_prefix_ratio=shared_prefix_ratio,
                tokenizer_dir=tokenizer, prompt_file=prompt_file),
            model=model, api_key=api_key, duration=duration,
            requests=64 if requests is None and duration is None else requests,
            warmup=warmup, temperature=temperature, seed=seed, allow_cache=allow_cache, timeout=timeout,
            goodput=bench_config.parse_goodput(goodput) if goodput else None)
        dataset = prepare(config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run(config, dataset, json_path, png_path))


if __name__ == "__main__":
    main()
