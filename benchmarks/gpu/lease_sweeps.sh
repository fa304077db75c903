#!/usr/bin/env bash
# One lease, the what-if twins of both engines on one GPU, then vLLM's serve stage (issue #20) in the time
# left (drive, bench and drive --env-per-request, which pays bench's client cost). Run DETACHED once vLLM is
# installed (benchmarks/gpu/detach.sh), while SGLang's wheel parts still travel.
#
# The lease, from the repository root here (parts: wheel_parts.sh, SGLang's with ALREADY=.gpu-wheels/vllm/wheels):
#   calls 1-7:  carry .gpu-wheels/vllm/partNN;  mkdir -p /root/w/v && cp .gpu-wheels/vllm/partNN /root/w/v/
#   call 8:     carry vllm/part07 and sglang/part09 (small last parts fit one call); copy both, then
#               cat /root/w/v/part* | tar -x -C /root && python3 -m pip install -q --no-deps --no-index /root/wheels/*.whl
#               && bash benchmarks/gpu/detach.sh lease 'bash benchmarks/gpu/lease_sweeps.sh h200 /root/sgx/wheels'
#   calls 9-17: SGLang's parts 00-08 into /root/w/s/; the last one unpacks (wheel_parts.sh's header) and
#               touches /root/sgx/wheels/.complete
#   then poll (`sleep 240; tail -n 5 /root/jobs/lease.log`) and tar /root/vsw /root/ssw /root/fidv into $OUT.
# Seen: a part call ~4 s; vLLM sweep ~3.5 min with its engine start; SGLang sweep ~6 min (8 engine starts).
#
set -u
PREFIX=${1:?usage: lease_sweeps.sh PREFIX SGWHEELS}
SGWHEELS=${2:?usage: lease_sweeps.sh PREFIX SGWHEELS}
stamp() { echo "== $(date -u +%T) $*"; }
stamp "vLLM sweep"
SWEEP_TIMEOUT_S=900 MOECAP_COUNT_ON=device bash benchmarks/gpu/sweep_vllm.sh /root/vsw "$PREFIX"
stamp "SGLang install (waiting for its wheels)"
until [ -f "$SGWHEELS/.complete" ]; do sleep 2; done
python3 -m pip uninstall -y -q vllm
python3 -m pip install -q --no-deps --no-index --target /root/sx "$SGWHEELS"/*.whl
stamp "SGLang sweep"
PYTHONPATH=/root/sx SWEEP_TIMEOUT_S=900 bash benchmarks/gpu/sweep_sglang.sh /root/ssw "$PREFIX"
stamp "vLLM serve stage (b64)"
python3 -m pip install -q --no-deps --no-index /root/wheels/vllm-*.whl
(source benchmarks/gpu/env.sh && python benchmarks/gpu/engine_fidelity.py --engine vllm --stages serve \
  --serve-batches 64 --budget-s 600 --drive-variant=--env-per-request --out /root/fidv)
stamp "done"
