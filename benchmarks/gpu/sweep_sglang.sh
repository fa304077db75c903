#!/usr/bin/env bash
# One SGLang sweep on one GPU, the twin of sweep_vllm.sh: random-weight Qwen1.5-MoE-A2.7B (no checkpoint, no
# tokenizer: prompts are token ids, skip_tokenizer_init), synthetic:1024x128 at concurrencies $BATCH_SIZES
# (default 1, 2, 4, 8, 16, 32, 64, 128 — the what-if twins: run it unchanged on the H100 and on the H200),
# 2 waves per point, bf16, --mem-fraction-static 0.8, CUDA graphs on (SGLang's default).
#
# Each point is `moecap-collect run --engine sglang` with the point's batch size as SGLang's
# max_running_requests, so SGLang starts once PER POINT (docs/sweep.md says why): 8 engine starts of
# ~40-120 s. One call stops itself with SIGINT at $SWEEP_TIMEOUT_S (default 500 s, under the device's
# 600 s per command): the point in flight is closed and marked interrupted, the finished ones are kept.
# Call the script again on the same machine to record the rest ($WORK is off $OUT); it prints
# "sweep exit 0" once every point is recorded. With AGAIN=1 (after a complete sweep) the same command
# again, which must skip every point without starting an engine; with KILL_AFTER=N a run killed with
# SIGKILL after N recorded points plus the re-run that records the rest.
#
#   bash benchmarks/gpu/sweep_sglang.sh OUT [PREFIX]      # from the repository root, SGLang installed
#
# moecap is not pip-installed on the GPU machine: the script writes the `sglang.srt.plugins` entry point
# as a .dist-info onto PYTHONPATH, so SGLang's spawned schedulers load the tracer. Leaves OUT/sweep/
# (traces + sweep.json, a few MB) and OUT/sweep*.log. Check it where the analyzer is installed:
# python benchmarks/gpu/sweep_check.py OUT/sweep
set -uo pipefail
OUT=${1:?usage: sweep_sglang.sh OUT [PREFIX]}
PREFIX=${2:-h100}
source benchmarks/gpu/env.sh
export PREFIX WORK=/root/moecap-sglang-sweep   # off $OUT, so a second call on the same machine resumes it
mkdir -p "$OUT" "$WORK"
python3 -c "from moecap.collect.engines.sglang.adapter import write_plugin_dist_info as w; w('$WORK/plugin')"
export PYTHONPATH="$WORK/plugin:$PYTHONPATH"
sweep() {
  # exec: the function's subshell becomes the sweep itself, so `kill $!` reaches Python.
  exec python3 -c 'from moecap.collect.cli import main; main()' sweep \
    --engine sglang --model analyze/specs/models/Qwen__Qwen1.5-MoE-A2.7B.json --random-weights --dtype bf16 \
    --engine-args '--mem-fraction-static 0.8 --context-length 2048' \
    --task synthetic:1024x128 --batch-sizes "${BATCH_SIZES:-1,2,4,8,16,32,64,128}" --waves 2 \
    --name "$PREFIX-sglang-sweep" --out "$WORK/sweep" "$@"
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
  sleep 5  # SGLang's schedulers die with their parent (PR_SET_PDEATHSIG); let the GPU memory go
fi
# SIGINT at $SWEEP_TIMEOUT_S to the sweep alone (--foreground: not to SGLang's schedulers, which the sweep
# asks to close their files before it shuts the engine down, as `run` does): the point in flight is closed
# and resumable, finished points are kept; SIGKILL 45 s later if the stop hangs (the schedulers die with
# their parent; the point is then `killed` and recorded again by the next call).
n=$(ls "$OUT"/sweep*.log 2>/dev/null | wc -l)
timeout --foreground -k 45 -s INT "${SWEEP_TIMEOUT_S:-500}" bash -c "$(declare -f sweep); sweep" > "$OUT/sweep-$n.log" 2>&1
rc=$?
echo "sweep exit $rc"; grep -E "recorded|FAILED|interrupted|skipped|engine start" "$OUT/sweep-$n.log" | tail -n 14
if [ $rc -eq 0 ] && [ -n "${AGAIN:-}" ]; then
  (sweep) > "$OUT/sweep-again.log" 2>&1   # everything recorded: skips all, starts no engine
  echo "re-run exit $?"; tail -n 4 "$OUT/sweep-again.log"
fi
cp -r "$WORK/sweep" "$OUT/" && du -sh "$OUT/sweep"
