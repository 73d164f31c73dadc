#!/bin/sh
# The image's entry point: fill in what only the running container knows, then run the command as given.
#
# MOEMESH_ADVERTISE_PORT=P  a worker (or an expert shard) registers with the scheduler as <this container's IP>:P,
#                           unless MOEMESH_WORKER_ADVERTISE_ADDRESS / MOEMESH_SHARD_ADVERTISE_ADDRESS is set: every
#                           replica of `docker compose up --scale worker=N` then gives its own address, where a
#                           fixed one in the compose file would send every replica's traffic to one of them.
#                           MOEMESH_ADVERTISE_HOST overrides the IP (e.g. a name the scheduler resolves).
set -eu
if [ -n "${MOEMESH_ADVERTISE_PORT:-}" ]; then
    host="${MOEMESH_ADVERTISE_HOST:-}"
    if [ -z "$host" ]; then
        host="$(hostname -i 2>/dev/null | awk '{print $1}')"
    fi
    if [ -z "$host" ]; then
        echo "moemesh-entrypoint: cannot find this container's address (hostname -i); set MOEMESH_ADVERTISE_HOST" >&2
        exit 2
    fi
    case "$host" in *:*) host="[$host]" ;; esac  # an IPv6 address
    export MOEMESH_WORKER_ADVERTISE_ADDRESS="${MOEMESH_WORKER_ADVERTISE_ADDRESS:-$host:$MOEMESH_ADVERTISE_PORT}"
    export MOEMESH_SHARD_ADVERTISE_ADDRESS="${MOEMESH_SHARD_ADVERTISE_ADDRESS:-$host:$MOEMESH_ADVERTISE_PORT}"
fi
exec "$@"
