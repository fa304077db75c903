#!/usr/bin/env bash
# One vLLM sweep on one GPU: random-weight Qwen1.5-MoE-A2.7B (no checkpoint, no tokenizer: prompts are
# token ids, skip_tokenizer_init), synthetic:1024x128 at concurrencies $BATCH_SIZES (default 1, 2, 4, 8,
# 16, 32, 64, 128 — the what-if twins: run it unchanged on the H100 and on the H200), 2 waves per point,
# one engine start. With AGAIN=1 the same command again, which must skip every point without starting
# the engine; with KILL_AFTER=N a run killed with SIGKILL after N recorded points plus the re-run that
# records the rest.
#
#   bash benchmarks/gpu/sweep_vllm.sh OUT [PREFIX]        # run from the repository root, vLLM installed
#
# Leaves OUT/sweep/ (traces + sweep.json, a few MB) and OUT/sweep*.log. Check it where the analyzer is
# installed: python benchmarks/gpu/sweep_check.py OUT/sweep
set -uo pipefail
OUT=${1:?usage: sweep_vllm.sh OUT [PREFIX]}
PREFIX=${2:-h100}
source benchmarks/gpu/env.sh
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PREFIX WORK=/root/moecap-sweep   # off $OUT, so a second call on the same machine resumes it
mkdir -p "$OUT" "$WORK"
sweep() {
  # exec: the function's subshell becomes the sweep itself, so `kill $!` reaches Python (on the H100 a
  # SIGKILL of the subshell left the sweep running beside the resumed one).
  exec python3 -c 'from moecap.collect.cli import main; main()' sweep \
    --engine vllm --model analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json --random-weights --dtype bf16 \
    --engine-args '--gpu-memory-utilization 0.85 --max-model-len 2048 --max-num-seqs 128' \
    --task synthetic:1024x128 --batch-sizes "${BATCH_SIZES:-1,2,4,8,16,32,64,128}" --waves 2 --name "$PREFIX-vllm-sweep" \
    --out "$WORK/sweep" "$@"
}
if [ -n "${KILL_AFTER:-}" ]; then
  sweep > "$OUT/sweep-killed.log" 2>&1 &
  pid=$!
  until python3 -c "import json,sys; p=json.load(open('$WORK/sweep/sweep.json'))['points'].values(); sys.exit(sum(x['status']=='done' for x in p) < $KILL_AFTER)" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  kill -KILL $pid 2>/dev/null && echo "killed the sweep after $KILL_AFTER point(s)"
  wait $pid 2>/dev/null
fi
# SIGINT at 420 s: whatever is left is closed and resumable, never lost
timeout -s INT "${SWEEP_TIMEOUT_S:-420}" bash -c "$(declare -f sweep); sweep" > "$OUT/sweep.log" 2>&1
rc=$?
echo "sweep exit $rc"; tail -n 12 "$OUT/sweep.log"
if [ $rc -eq 0 ] && [ -n "${AGAIN:-}" ]; then
  (sweep) > "$OUT/sweep-again.log" 2>&1   # everything recorded: skips all, starts no engine
  echo "re-run exit $?"; tail -n 4 "$OUT/sweep-again.log"
fi
cp -r "$WORK/sweep" "$OUT/" && du -sh "$OUT/sweep"
