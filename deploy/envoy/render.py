"""Envoy's configuration for containers: `moemesh.envoy`'s, with the gateways found by DNS.

    python deploy/envoy/render.py --gateway gateway:50051 --host 0.0.0.0 --port 8080 \
        --out /etc/moemesh-envoy/envoy.json [--tls-cert edge.crt --tls-key edge.key]

`moemesh.envoy` lists gateways by IP (a STATIC cluster), as a local run knows
them. In containers the gateways are a name that resolves to every replica (a
compose service scaled with --scale, a Kubernetes headless Service whose pods
come and go with the HorizontalPodAutoscaler), so here the cluster is
STRICT_DNS: Envoy resolves the name every few seconds and balances over every
address it returns, each health-checked on grpc.health.v1. The admin interface
(which can stop Envoy) listens on 127.0.0.1 only, whatever the listener's host.
The contract's descriptor set (for gRPC-JSON transcoding) is written beside the
output. The file's layout (deploy/envoy/ under a folder holding protos/) is the
same in the repository and in the image (/opt/moemesh).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository, or /opt/moemesh in the image: holds protos/
DNS_REFRESH_SECONDS = 5


def render(gateways: list[str], *, host: str, port: int, admin_port: int, out: pathlib.Path,
           tls_cert: pathlib.Path | None = None, tls_key: pathlib.Path | None = None) -> dict:
    """Write the configuration (and the descriptor set beside it) to `out`; returns it."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # after site-packages: only protos/ is taken from there
    from moemesh.envoy import EnvoySettings, envoy_config
    from protos.generate import descriptor_set

    out.parent.mkdir(parents=True, exist_ok=True)
    settings = EnvoySettings(gateways=gateways, host=host, port=port, admin_port=admin_port,
                             descriptor_set=descriptor_set(out.parent.resolve() / "moemesh.pb"),
                             tls_cert=tls_cert, tls_key=tls_key)
    config = envoy_config(settings)
    config["admin"]["address"]["socket_address"]["address"] = "127.0.0.1"
    for cluster in config["static_resources"]["clusters"]:
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
        cluster["dns_refresh_rate"] = f"{DNS_REFRESH_SECONDS}s"
        cluster["respect_dns_ttl"] = False
    out.write_text(json.dumps(config, indent=2) + "\n")
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="render.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="append", required=True, help="gateway gRPC name:port (repeat)")
    parser.add_argument("--host", default="0.0.0.0", help="the listener's address")
    parser.add_argument("--port", type=int, default=8080, help="the listener's port")
    parser.add_argument("--admin-port", type=int, default=9901, help="the admin interface's port (on 127.0.0.1)")
    parser.add_argument("--tls-cert", type=pathlib.Path, help="the edge's certificate (PEM); with --tls-key: TLS")
    parser.add_argument("--tls-key", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    import pydantic

    try:
        render(args.gateway, host=args.host, port=args.port, admin_port=args.admin_port, out=args.out,
               tls_cert=args.tls_cert, tls_key=args.tls_key)
    except pydantic.ValidationError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
