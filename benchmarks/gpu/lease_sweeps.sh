#!/usr/bin/env bash
# One lease, the what-if twins of both engines on one GPU, then vLLM's serve stage (issue #20) in the time
# left (drive, bench and drive --env-per-request, which pays bench's client cost). Run DETACHED once vLLM is
# installed (benchmarks/gpu/detach.sh), while SGLang's wheel parts still travel:
#
#   bash benchmarks/gpu/detach.sh lease 'bash benchmarks/gpu/lease_sweeps.sh h200 /root/sgx/sgwheels'
#   tail /root/jobs/lease.log                 # poll; cat /root/jobs/lease.rc once it has ended
#
# The SGLang half waits for SGWHEELS/.complete (written by the call that unpacks SGLang's last part), then
# swaps vLLM out (`pip uninstall vllm`, SGLang --target on PYTHONPATH, as docs/whatif.md says), and vLLM comes
# back (from /root/wheels) for the serve stage. Leaves /root/vsw/sweep, /root/ssw/sweep, /root/fidv.
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
