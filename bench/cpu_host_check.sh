#!/usr/bin/env bash
# The CPU measurements a 2-core development machine cannot make, for a machine with more cores (the GPU device
# machine has 16; its GPU goes unused here):
#
#   bash bench/cpu_host_check.sh      (about 5 minutes on 16 cores; set up as bench/gpu_check.sh is)
#
# 1. python -m bench.ep_bench --ranks 2,4 --seqs 1,32: expert-parallel replicas against the single process, and
#    each layer exchange against a bare gRPC round trip of its messages (target <= 1.5x). On 2 cores, 4 ranks
#    leave 1 to 1.8 of their threads waiting for a core on average, and the exchange pays for it;
# 2. python -m bench.mesh_vs_engine --repeats 1: the mesh on its defaults, driven by the OpenAI SDK from another
#    process, against the in-process engine (targets >= 0.9 of its tokens/s, inter-token <= 1.15x its decode
#    step). On 2 cores the client's parsing takes the cores the engine needs.
#
# The wheels in .whl/ (scripts/gpu_wheels.sh) include the openai SDK the second needs. Logs go to $OUT (default
# /tmp/moemesh-cpu-host-check); `nproc` and the CPU model lead the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh /tmp/moemesh-cpu-host-check
{ nproc; grep -m1 "model name" /proc/cpuinfo; } 2>&1 | tee "$OUT/cpu.txt"
timeout "${EP_BENCH_TIMEOUT:-240}" "$PYTHON" -m bench.ep_bench --ranks 2,4 --seqs 1,32 --out "$OUT/ep-bench.json" \
  2>&1 | grep -v "^Writing model shards" | tee "$OUT/ep-bench.log"
ep_status=${PIPESTATUS[0]}
timeout "${MESH_BENCH_TIMEOUT:-240}" "$PYTHON" -m bench.mesh_vs_engine --repeats 1 2>&1 \
  | grep -v "^Writing model shards" | tee "$OUT/mesh-vs-engine.log"
mesh_status=${PIPESTATUS[0]}
echo "ep_bench exit status $ep_status, mesh_vs_engine exit status $mesh_status; logs in $OUT"
[ "$ep_status" -eq 0 ] && [ "$mesh_status" -eq 0 ]
