# Sourced by the device checks (bench/gpu_check.sh, bench/cpu_host_check.sh), from the checkout's root: makes
# this checkout importable as `moemesh` without installing it, installs the wheels in .whl/ (scripts/gpu_wheels.sh
# downloads them on a machine with a package index) for the device machine's Python, and sets OUT (default
# $1) and PYTHON (default python3).
OUT="${OUT:-$1}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
site=$(mktemp -d)
cp -r moemesh "$site/"
for part in gateway worker cache services protos; do ln -s "$PWD/$part" "$site/moemesh/$part"; done
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    || { echo "device check: installing .whl/ failed" >&2; exit 1; }
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
