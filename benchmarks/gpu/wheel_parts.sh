#!/usr/bin/env bash
# The engine's wheels for the GPU machine, in parts that travel WITH THIS CHECKOUT: a device call carries
# at most 64 MiB, the tracked tree included (9 MiB on 2026-12-06), so ../shared/gpu/wheelhouse.sh's
# 60 MiB parts no longer fit one per call. Re-splits them to 64 MiB - tree - 2 MiB margin.
#
#   bash benchmarks/gpu/wheel_parts.sh 'sglang==0.5.16' .gpu-wheels/sglang    # from the repository root
#   bash benchmarks/gpu/wheel_parts.sh 'vllm==0.26.0' .gpu-wheels/vllm
#
# Keep .gpu-wheels/ out of git (.gitignore has it). On the machine, one call per part, back to back
# (carry .gpu-wheels/<engine>/partNN; `mkdir -p /root/w && cp .gpu-wheels/<engine>/partNN /root/w/`), then
# `cat /root/w/part* | tar -x -C /root && python3 -m pip install -q --no-deps --no-index /root/wheels/*.whl`.
# Sizes seen 2026-12-06 with 52 MiB parts: vLLM 0.26.0 8 parts, SGLang 0.5.16 11 parts (sglang_kernel alone
# is 365 MiB, nearly all FlashAttention-3, which SGLang uses on Hopper).
#
# Both engines in one lease: ALREADY=DIR leaves out the wheels of DIR (the other engine's, already sent) and
# lists them in wheels/already.txt (SGLang after vLLM: 42 shared wheels, 71 MiB, 10 parts instead of 11):
#   ALREADY=.gpu-wheels/vllm/wheels bash benchmarks/gpu/wheel_parts.sh 'sglang==0.5.16' .gpu-wheels/sglang
# and on the machine unpack it beside, not over, the first engine's, then copy the shared ones in:
#   mkdir -p /root/sgx && cat /root/w/s/part* | tar -x -C /root/sgx && cd /root/sgx/wheels \
#     && xargs -a already.txt -I{} cp /root/wheels/{} . && touch .complete
set -euo pipefail
spec=${1:?usage: wheel_parts.sh SPEC OUTDIR}
out=${2:?usage: wheel_parts.sh SPEC OUTDIR}
shared=${SHARED:-$(cd "$(git rev-parse --show-toplevel)/.." && pwd)/shared}
bash "$shared/gpu/wheelhouse.sh" "$spec" "$out"
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
part=$(( (64 - 2) * 1024 * 1024 - tree ))
if [ -n "${ALREADY:-}" ]; then
  rm "$out"/part??
  rest=$out/.rest/wheels
  rm -rf "$out/.rest" && mkdir -p "$rest"
  for w in "$out"/wheels/*.whl; do
    if [ -e "$ALREADY/$(basename "$w")" ]; then basename "$w" >> "$rest/already.txt"; else ln "$w" "$rest/"; fi
  done
  tar -C "$out/.rest" -cf "$out/all.tar" wheels
else
  cat "$out"/part?? > "$out/all.tar"
  rm "$out"/part??
fi
split -b "$part" -d -a 2 "$out/all.tar" "$out/part"
rm "$out/all.tar"
echo "tree $((tree / 1024)) KiB; parts of $((part / 1024 / 1024)) MiB:"
ls -l "$out"/part??
