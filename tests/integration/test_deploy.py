"""The deployment material, checked against the real services: docker-compose.yml, the image, the Kubernetes manifests.

No Docker engine or cluster runs here, so each service command of the compose file and of the manifests is run
through that service's real `main()` (its real flags and config loader; only `serve` is replaced), with the
environment the container would have (the image's entry point run for real, Kubernetes' `$(VAR)` expansion,
Secrets written as the files a secret volume holds), and the result is checked against ports, probes, health
checks and grace periods. The manifests are validated against the Kubernetes schemas (kubernetes-validate), the
Envoy configuration by the real Envoy, the health check command and the worker's backend log line on real
processes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.envoy import envoy_binary
from moemesh.services.core import entrypoint
from moemesh.services.core.server import LIVENESS_SERVICE
from moemesh.worker.embeddings.sentence import default_embedding_model_dir
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from moemesh.worker.ops import native
from moemesh.worker.ops.report import describe_backends
from tests.support.checkpoints import build_tiny_mixtral
from tests.support.mesh import DEMO_MODEL, Service

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33"
SERVICES = {  # compose service / Kubernetes component -> the module its container runs
    "scheduler": "moemesh.services.scheduler.main",
    "worker": "moemesh.worker.server.main",
    "gateway": "moemesh.gateway.main",
}
# Paths of the image (deploy/docker/Dockerfile) -> what stands in for them here.
IMAGE_PATHS = {
    "/opt/moemesh/models/demo-moe": str(DEMO_MODEL),
    "/opt/moemesh/models/all-minilm-l6-v2": str(default_embedding_model_dir()),
}
DOT_ENV = {  # what an operator puts in .env (deploy/docker/moemesh.env.example)
    "MOEMESH_CLUSTER_TOKEN": "c" * 32,
    "MOEMESH_KV_TIER_SECRET": "k" * 32,
    "REDIS_PASSWORD": "p" * 32,
}
SECRET_VALUES = {  # the Kubernetes Secrets (deploy/k8s/secrets.example.yaml), filled in
    ("moemesh-internal", "cluster-token"): "t" * 32,
    ("moemesh-internal", "kv-tier-secret"): "s" * 32,
    ("moemesh-redis", "password"): "r" * 32,
    ("moemesh-tenants", "tenants.json"): '{"tenants": []}',
}


# ---- running a service's real main() on a container's command --------------------------------------------------
def load_service(module_name: str, argv: list[str], env: dict[str, str], monkeypatch):
    """The validated config the service's `main()` builds from `argv` and exactly `env` (nothing is served)."""
    module = importlib.import_module(module_name)
    built = []

    async def capture(config, ready_fd):
        built.append(config)

    for name in list(os.environ):
        if name.startswith(("MOEMESH_", "OTEL_", "REDIS_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(module, "serve", capture)
    monkeypatch.setattr(entrypoint, "setup_logging", lambda *a, **k: None)
    code = module.main(argv)
    assert code == 0 and built, f"{module_name} refused {argv} with {sorted(env)} (exit {code})"
    return built[0]


def localize(value: str, paths: dict[str, str]) -> str:
    for container_path, here in sorted(paths.items(), key=lambda p: -len(p[0])):
        value = value.replace(container_path, here)
    return value


def module_of(command: list[str]) -> tuple[str, list[str]]:
    assert command[:2] == ["python", "-m"], command
    return command[2], command[3:]


def entrypoint_env(env: dict[str, str], path: str | None = None) -> dict[str, str]:
    """The environment the image's entry point hands the command (run for real, printing `env`)."""
    run_env = {"PATH": path or os.environ["PATH"], **env}
    out = subprocess.run(["sh", str(ENTRYPOINT), "env", "-0"], env=run_env, capture_output=True, text=True,
                         timeout=10, check=True).stdout
    result = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    result.pop("PATH", None)
    result.pop("PWD", None)
    return result


def render_module():
    """deploy/envoy/render.py, the script the image runs to write Envoy's configuration."""
    path = ROOT / "deploy" / "envoy" / "render.py"
    spec = importlib.util.spec_from_file_location("moemesh_deploy_envoy_render", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- docker-compose.yml -----------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if op == ":?" and not env.get(name):
            raise AssertionError(f"compose refuses to start without {name}: {arg}")
        return env.get(name) or (arg if op == ":-" else "")
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value).replace("$$", "$")


def compose_container(name: str, tmp: pathlib.Path, hostname_path: str | None = None):
    """(module, argv, env, service) of compose service `name`, as its container would run it."""
    spec = compose()["services"][name]
    secrets_dir = tmp / f"{name}-secrets"
    secrets_dir.mkdir(exist_ok=True)
    top = compose()["secrets"]
    for secret in spec.get("secrets", []):
        source, target = (secret, secret) if isinstance(secret, str) else (secret["source"], secret.get("target"))
        (secrets_dir / target).write_text(DOT_ENV[top[source]["environment"]])
    paths = {**IMAGE_PATHS, "/run/secrets": str(secrets_dir)}
    env = {k: localize(interpolate(str(v), DOT_ENV), paths) for k, v in spec.get("environment", {}).items()}
    env = entrypoint_env(env, hostname_path)
    module, argv = module_of(spec["command"])
    return module, [localize(a, paths) for a in argv], env, spec


def test_compose_services_start_with_their_flags_secrets_and_health_checks(tmp_path, monkeypatch):
    services = compose()["services"]
    configs = {}
    for name, module_name in SERVICES.items():
        module, argv, env, spec = compose_container(name, tmp_path)
        assert module == module_name
        config = configs[name] = load_service(module, argv, env, monkeypatch)
        # Reachable from the other containers, credentials from secret files only (never argv).
        assert config.host == "0.0.0.0"
        assert config.cluster_token.get_secret_value() == DOT_ENV["MOEMESH_CLUSTER_TOKEN"]
        assert not any(secret in " ".join(spec["command"]) for secret in ("token", "password", "secret"))
        # The health check asks the real grpc.health.v1 service on the service's own port.
        assert spec["healthcheck"]["test"] == ["CMD", "moemesh", "health", "--target", f"127.0.0.1:{config.port}"]
        assert env["MOEMESH_HEALTH_PORT"] == str(config.port)
        assert config.metrics_port == 9464
    scheduler, worker, gateway = configs["scheduler"], configs["worker"], configs["gateway"]
    assert worker.scheduler == gateway.scheduler == f"scheduler:{scheduler.port}"
    redis_url = f"redis://:{DOT_ENV['REDIS_PASSWORD']}@redis:6379/0"
    assert gateway.redis_url == worker.kv_tier_url == redis_url
    assert worker.kv_tier_secret.get_secret_value() == DOT_ENV["MOEMESH_KV_TIER_SECRET"]
    assert worker.model_dir == DEMO_MODEL and worker.embedding_model_dir == default_embedding_model_dir()
    assert worker.drain_grace < _seconds(services["worker"]["stop_grace_period"])
    assert gateway.grace < _seconds(services["gateway"]["stop_grace_period"])
    # Published: the gateway's two ports (on loopback) and Envoy's listener; nothing of the internal plane.
    assert services["gateway"]["ports"] == [f"127.0.0.1:{gateway.port}:{gateway.port}",
                                            f"127.0.0.1:{gateway.http_port}:{gateway.http_port}"]
    for internal in ("scheduler", "worker", "redis"):
        assert "ports" not in services[internal]
    # Health-gated start order.
    assert services["worker"]["depends_on"]["scheduler"] == {"condition": "service_healthy"}
    assert services["gateway"]["depends_on"]["scheduler"] == {"condition": "service_healthy"}
    # The image provides every path the compose commands name.
    dockerfile = DOCKERFILE.read_text()
    for container_path in IMAGE_PATHS:
        assert container_path in dockerfile


def _seconds(text: str) -> float:
    assert text.endswith("s")
    return float(text[:-1])


def test_scaled_workers_each_advertise_their_own_address(tmp_path, monkeypatch):
    spec = compose()["services"]["worker"]
    assert not {"container_name", "hostname", "ports"} & spec.keys()  # what would stop --scale worker=N
    assert "MOEMESH_WORKER_ADVERTISE_ADDRESS" not in spec["environment"]
    addresses = []
    for index, ip in enumerate(("172.20.0.5", "172.20.0.6")):
        fake = tmp_path / f"bin{index}"
        fake.mkdir()
        (fake / "hostname").write_text(f"#!/bin/sh\necho '{ip} fd00::{index}'\n")
        (fake / "hostname").chmod(0o755)
        module, argv, env, _ = compose_container("worker", tmp_path, f"{fake}:{os.environ['PATH']}")
        addresses.append(load_service(module, argv, env, monkeypatch).advertise_address)
    assert addresses == ["172.20.0.5:50053", "172.20.0.6:50053"]
    # With this machine's real `hostname -i`: an IP address and the worker's port.
    module, argv, env, _ = compose_container("worker", tmp_path)
    config = load_service(module, argv, env, monkeypatch)
    assert re.fullmatch(r"(\d+\.){3}\d+:50053|\[[0-9a-f:]+\]:50053", config.advertise_address)
    assert config.advertise_address.endswith(f":{config.port}")


def test_compose_envoy_config_is_valid_and_balances_over_the_gateways(tmp_path, monkeypatch):
    services = compose()["services"]
    spec = services["envoy-config"]
    assert spec["command"][:2] == ["python", "/opt/moemesh/deploy/envoy/render.py"]
    assert "/opt/moemesh/deploy/envoy/render.py" in DOCKERFILE.read_text()
    argv = [localize(a, {"/etc/moemesh-envoy": str(tmp_path)}) for a in spec["command"][2:]]
    assert render_module().main(argv) == 0
    config = yaml.safe_load((tmp_path / "envoy.json").read_text())
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert services["envoy"]["ports"] == [f"{listener['port_value']}:{listener['port_value']}"]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["type"] == "STRICT_DNS"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    gateway = services["gateway"]["command"]
    assert (endpoint["address"], str(endpoint["port_value"])) == ("gateway", gateway[gateway.index("--port") + 1])
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    # Both containers see the configuration at the same path (the descriptor set's path is absolute).
    assert services["envoy"]["volumes"] == ["envoy-config:/etc/moemesh-envoy:ro"]
    assert spec["volumes"] == ["envoy-config:/etc/moemesh-envoy"]
    result = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(tmp_path / "envoy.json")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_observability_profile_and_its_configs():
    services = compose()["services"]
    for name in ("otel-collector", "prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./") and "deploy/grafana" not in source:
                assert (ROOT / source).exists(), source
    prometheus = yaml.safe_load((ROOT / "deploy/observability/prometheus.yml").read_text())
    jobs = {job["job_name"]: job["dns_sd_configs"][0] for job in prometheus["scrape_configs"]}
    for name in SERVICES:
        assert jobs[f"moemesh-{name}"]["names"] == [name]
        metrics = services[name]["command"]
        assert jobs[f"moemesh-{name}"]["port"] == int(metrics[metrics.index("--metrics-port") + 1])
    collector = yaml.safe_load((ROOT / "deploy/observability/otel-collector.yaml").read_text())
    endpoint = services["worker"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint.endswith("http://otel-collector:4317}")
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    # Off unless asked for: the standard "none" exporter by default.
    assert services["worker"]["environment"]["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}"


# ---- the image --------------------------------------------------------------------------------------------------
def test_image_is_multi_stage_non_root_with_a_compiler_and_a_real_health_check():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)", text, re.M)
    names = [name for _, name in stages]
    assert {"base", "torch-cpu", "torch-cuda", "deps", "wheel", "runtime"} <= set(names)
    assert ("torch-${VARIANT}", "deps") in stages and ("deps", "runtime") in stages
    # Dependencies in their own layer: pyproject.toml alone is copied, and installed, before any source.
    deps = text.split("AS deps")[1].split("FROM ")[0]
    assert "COPY pyproject.toml ./" in deps and "pip install -r requirements.txt" in deps and "moemesh" not in deps
    base = text.split("AS base")[1].split("FROM ")[0]
    assert "gcc" in base and "useradd" in base  # the runtime image (from base) keeps the C compiler
    runtime = text.split("AS runtime")[1]
    assert re.search(r"^USER moemesh$", runtime, re.M)
    assert "MOEMESH_CACHE_DIR=/var/cache/moemesh" in runtime and "native.load_kernels()" in runtime
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD moemesh health --target "127\.0\.0\.1:\$\{MOEMESH_HEALTH_PORT',
                     runtime, re.M)
    assert 'ENTRYPOINT ["moemesh-entrypoint"]' in runtime
    for copied in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        assert (ROOT / copied).exists(), copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored


@pytest.fixture(scope="module")
def scheduler_and_worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    token = {"MOEMESH_SCHEDULER_CLUSTER_TOKEN": "d" * 32}
    scheduler = Service("moemesh.services.scheduler.main", "--port", "0", "--grace", "0", log=tmp / "scheduler.log",
                        env=token)
    worker = None
    try:
        worker = Service("moemesh.worker.server.main", "--port", "0", "--scheduler", scheduler.info["address"],
                         "--model-dir", str(DEMO_MODEL), "--num-threads", "1", "--no-pooled-embeddings",
                         "--num-kv-blocks", "64", "--max-num-seqs", "4", "--drain-grace", "0",
                         log=tmp / "worker.log", env={"MOEMESH_WORKER_CLUSTER_TOKEN": "d" * 32})
        yield scheduler, worker, tmp
    finally:
        for service in (worker, scheduler):
            if service is not None:
                service.stop()


def test_image_health_check_and_probe_names_answer_on_a_real_worker(scheduler_and_worker):
    _, worker, _ = scheduler_and_worker
    port = worker.info["address"].rsplit(":", 1)[1]
    command = re.search(r"CMD (moemesh health .*)$", DOCKERFILE.read_text(), re.M).group(1)
    moemesh = pathlib.Path(sys.executable).parent / "moemesh"
    result = subprocess.run(["sh", "-c", command.replace("moemesh health", f"{shlex.quote(str(moemesh))} health", 1)],
                            env={**os.environ, "MOEMESH_HEALTH_PORT": port}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    wrong = subprocess.run(["sh", "-c", command.replace("moemesh health", f"{shlex.quote(str(moemesh))} health", 1)],
                           env={**os.environ, "MOEMESH_HEALTH_PORT": "1"}, capture_output=True, timeout=30)
    assert wrong.returncode != 0
    # The names the Kubernetes probes ask for: readiness "" and liveness "moemesh.liveness", both SERVING.
    with grpc.insecure_channel(worker.info["address"]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", LIVENESS_SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_worker_start_logs_its_backends_and_why(scheduler_and_worker):
    _, _, tmp = scheduler_and_worker
    log = (tmp / "worker.log").read_text()
    assert "backends: experts: NativeExperts; attention: NativeAttention" in log
    assert "(cpu float32: native kernels built)" in log


def test_backend_line_names_the_fallback_without_a_compiler(tmp_path, monkeypatch):
    checkpoint = open_checkpoint(build_tiny_mixtral(tmp_path / "tiny"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc nor gcc, as in an image without a compiler
    monkeypatch.setenv("MOEMESH_CACHE_DIR", str(tmp_path / "cache"))  # and no cached build
    native.load_kernels.cache_clear()
    try:
        line = describe_backends(build_model(checkpoint))
    finally:
        native.load_kernels.cache_clear()  # the next caller loads them with the compiler again
    assert "experts: NativeExperts" not in line and "attention: NativeAttention" not in line
    assert line.endswith("(cpu float32: native kernels unavailable, fallback: no C compiler found "
                         "(set CC, or install gcc))")


# ---- Kubernetes -------------------------------------------------------------------------------------------------
def manifests(*variants: str) -> list[dict]:
    docs = []
    for folder in ("base", *variants):
        for path in sorted((K8S / folder).glob("*.yaml")):
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] != "Kustomization"]
    return docs


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    checked = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "Kustomization":
                for resource in doc["resources"]:
                    assert (path.parent / resource).exists(), f"{path}: {resource}"
                continue
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # strict: an unknown field fails too
            checked += 1
    assert checked >= 25
    for variant in ("cpu", "cuda"):  # each variant is the whole mesh: base + its workers
        kustomization = yaml.safe_load((K8S / variant / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["../base", "worker.yaml"]


def pod_env(container: dict, pod_name: str, secrets: dict) -> dict[str, str]:
    """A container's environment as the kubelet makes it: fieldRefs, secretKeyRefs, then $(VAR) expansion."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "fieldRef" in item["valueFrom"]:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            value = {"metadata.name": pod_name, "metadata.namespace": "moemesh"}[field]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            value = secrets[(ref["name"], ref["key"])]
        env[item["name"]] = value
    return env


def mount_secrets(pod: dict, container: dict, root: pathlib.Path) -> dict[str, str]:
    """Write each secret volume the container mounts as the kubelet does; returns mountPath -> local directory."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" not in volume:
            continue
        directory = root / mount["name"]
        (directory / "..data").mkdir(parents=True, exist_ok=True)
        name = volume["secret"]["secretName"]
        for item in volume["secret"]["items"]:
            (directory / "..data" / item["path"]).write_text(SECRET_VALUES[(name, item["key"])])
            # as the kubelet lays a secret volume out: each key a link into ..data
            (directory / item["path"]).symlink_to(pathlib.Path("..data") / item["path"])
        paths[mount["mountPath"]] = str(directory)
    return paths


def k8s_container(workload: dict, root: pathlib.Path, pod_name: str, monkeypatch):
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    paths = {**IMAGE_PATHS, **mount_secrets(pod, container, root)}
    env = {k: localize(v, paths) for k, v in pod_env(container, pod_name, SECRET_VALUES).items()}
    module, _ = module_of(container["command"])
    argv = [localize(a, paths) for a in container["args"]]
    return pod, container, module, load_service(module, argv, env, monkeypatch)


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_k8s_containers_load_with_the_real_config_and_probes_and_ports_agree(variant, tmp_path, monkeypatch):
    docs = manifests(variant)
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    services = by_kind(docs, "Service")
    configs, pods = {}, {}
    for component, module_name in SERVICES.items():
        workload = workloads[f"moemesh-{component}"]
        pod, container, module, config = k8s_container(workload, tmp_path / component, f"moemesh-{component}-1",
                                                       monkeypatch)
        assert module == module_name
        configs[component], pods[component] = config, pod
        assert config.host == "0.0.0.0"
        assert config.cluster_token.get_secret_value() == SECRET_VALUES[("moemesh-internal", "cluster-token")]
        args = " ".join(container["args"])
        assert not any(value in args for value in SECRET_VALUES.values())
        assert not any(word in args for word in ("token", "password", "secret"))
        # Probes: Kubernetes' own gRPC probes on the real health services, on the port the service binds.
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == config.port and ports["metrics"] == config.metrics_port
        assert container["readinessProbe"]["grpc"] == {"port": config.port, "service": ""}
        assert container["livenessProbe"]["grpc"] == {"port": config.port, "service": LIVENESS_SERVICE}
        grace = config.drain_grace if component == "worker" else config.grace
        assert pod["terminationGracePeriodSeconds"] > grace
        assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        service = services[f"moemesh-{component}"]
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == config.port
    scheduler, worker, gateway = configs["scheduler"], configs["worker"], configs["gateway"]
    assert worker.scheduler == gateway.scheduler == f"moemesh-scheduler:{scheduler.port}"
    # Stable identity: the pod's name is the node id and the replica group; its DNS name (headless Service, published
    # before readiness because the worker registers before it serves) is the address it advertises.
    worker_set = workloads["moemesh-worker"]
    assert worker.node_id == worker.replica_group == "moemesh-worker-1"
    dns_name = f"moemesh-worker-1.{worker_set['spec']['serviceName']}.moemesh.svc.cluster.local"
    assert worker.advertise_address == f"{dns_name}:{worker.port}"
    headless = services[worker_set["spec"]["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    redis_password = SECRET_VALUES[("moemesh-redis", "password")]
    assert gateway.redis_url == worker.kv_tier_url == f"redis://:{redis_password}@moemesh-redis:6379/0"
    assert {p["port"] for p in services["moemesh-redis"]["spec"]["ports"]} == {6379}
    assert worker.kv_tier_secret.get_secret_value() == SECRET_VALUES[("moemesh-internal", "kv-tier-secret")]
    assert pathlib.Path(gateway.tenants_file).read_text() == SECRET_VALUES[("moemesh-tenants", "tenants.json")]
    worker_container = worker_set["spec"]["template"]["spec"]["containers"][0]
    if variant == "cuda":
        assert worker.device == "cuda" and worker_container["image"] == "moemesh:cuda"
        assert worker_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert worker.device == "cpu" and "nvidia.com/gpu" not in str(worker_container["resources"])


def test_k8s_envoy_edge_hpa_and_disruption_budgets(tmp_path, monkeypatch):
    docs = manifests("cpu")
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    envoy = deployments["moemesh-envoy"]["spec"]["template"]["spec"]
    init = envoy["initContainers"][0]
    assert init["command"] == ["python", "/opt/moemesh/deploy/envoy/render.py"]
    out = tmp_path / "envoy"
    args = [localize(a, {"/etc/moemesh-envoy": str(out)}) for a in init["args"]]
    assert render_module().main(args) == 0
    config = yaml.safe_load((out / "envoy.json").read_text())
    listener = config["static_resources"]["listeners"][0]
    edge_port = listener["address"]["socket_address"]["port_value"]
    assert envoy["containers"][0]["ports"] == [{"name": "edge", "containerPort": edge_port}]
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"][0]
    mounts = {m["mountPath"]: m["name"] for m in envoy["containers"][0]["volumeMounts"]}
    assert str(pathlib.Path(tls["certificate_chain"]["filename"]).parent) in mounts
    endpoint = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    host, port = endpoint["endpoint"]["address"]["socket_address"].values()
    gateway_pods = services[host]["spec"]
    assert gateway_pods["clusterIP"] == "None" and gateway_pods["ports"][0]["port"] == port
    assert services["moemesh-edge"]["spec"]["type"] == "LoadBalancer"
    # The HorizontalPodAutoscaler scales the gateways on CPU, which they request.
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["moemesh-gateway"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "moemesh-gateway"}
    assert deployments["moemesh-gateway"]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    # Each PodDisruptionBudget selects the pods of a workload with more than one replica.
    workloads = {**deployments, **by_kind(docs, "StatefulSet")}
    budgets = by_kind(docs, "PodDisruptionBudget")
    assert set(budgets) == {"moemesh-gateway", "moemesh-envoy", "moemesh-worker"}
    for name, budget in budgets.items():
        workload = workloads[name]["spec"]
        assert budget["spec"]["selector"]["matchLabels"] == workload["selector"]["matchLabels"]
        assert workload["replicas"] >= 2


def allowed(policies: list[dict], target: dict, source: dict | None, port: int) -> bool:
    """Whether NetworkPolicies let `source` (pod labels in the namespace; None: outside it) reach `target` on `port`."""
    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    governing = [p for p in policies if selects(p["spec"]["podSelector"], target)]
    assert governing, "every pod is governed (default deny)"
    for policy in governing:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "podSelector" in peer and "namespaceSelector" not in peer and source is not None \
                        and selects(peer["podSelector"], source):
                    return True
    return False


def test_k8s_network_policies_let_only_the_edge_in_from_outside():
    docs = manifests("cpu")
    policies = list(by_kind(docs, "NetworkPolicy").values())
    pods = {}
    for name, workload in {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}.items():
        template = workload["spec"]["template"]
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        pods[name.removeprefix("moemesh-")] = (template["metadata"]["labels"], ports)
    assert set(pods) == {"envoy", "gateway", "scheduler", "worker", "redis"}
    expected = {("envoy", "gateway", 50051), ("gateway", "scheduler", 50052), ("worker", "scheduler", 50052),
                ("scheduler", "worker", 50053), ("gateway", "redis", 6379), ("worker", "redis", 6379),
                ("envoy", "gateway", 8000)}
    for target, (labels, ports) in pods.items():
        for port in ports:
            from_outside = allowed(policies, labels, None, port)
            assert from_outside == (target == "envoy"), (target, port)
            for source, (source_labels, _) in pods.items():
                if source == target:
                    continue
                assert allowed(policies, labels, source_labels, port) == ((source, target, port) in expected
                                                                          or target == "envoy"), (source, target, port)
