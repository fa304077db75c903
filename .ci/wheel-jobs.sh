#!/usr/bin/env bash
# Users' installs, each in a fresh venv in a fresh copy of the checkout (nothing cached, nothing editable):
#
#   analyze     README command 1 as written (pip builds the wheel of '.[analyze]' and installs it), then
#               the README's reference-mode example on the shipped batch_data.json, whose numbers must be
#               the oracle's (tests/data/oracle_cases.json, the case the sample's records come from), then
#               notebooks/README.md's commands as written (the notebooks extra, one notebook executed).
#   collect-hf  pip install torch==2.13.0 '.[collect,hf]' alone, then the README's CPU run
#               (--model tiny-qwen2-moe); its trace is analysed with the [analyze] venv of the first job
#               (a GPU host collects, another machine analyses).
#
#   bash .ci/wheel-jobs.sh          # both jobs; prints each job's time; exit 1 if one fails
#
# Called by .ci/run after the main suite. The copy holds the checkout's tracked and new files (what a
# clean clone has), so no .venv, build/ or egg-info of this checkout can stand in for a missing step.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/moecap-wheel-jobs.XXXXXX")
[ -n "${MOECAP_KEEP_WHEEL_JOBS:-}" ] || trap 'rm -rf "$work"' EXIT
readme() { python3 "$ROOT/tests/readme_commands.py" "$@"; }
export MOECAP_CACHE_DIR=$work/cache  # the analyzer's Parquet cache: neither read from nor left for later runs

fresh_copy() { # the checkout's files as a clean clone would have them (plus new, unignored files)
  mkdir -p "$1"
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$1"
}

fail() { echo "wheel-jobs: $*" >&2; exit 1; }

job_analyze() {
  local a=$work/analyze
  fresh_copy "$a"
  cd "$a"
  local cmd1
  cmd1=$(readme setup 1)
  echo "== [analyze] $cmd1" >&2
  bash -euo pipefail -c "$cmd1" >"$work/analyze-cmd1.log" 2>&1 || { cat "$work/analyze-cmd1.log" >&2; fail "README command 1 failed"; }
  [ -s results/metrics.json ] || fail "README command 1 wrote no results/metrics.json"
  # A user's install: moecap from the wheel (not this folder), no torch or engine pulled in.
  .venv/bin/python - <<'EOF' || fail "the [analyze] venv is not a plain wheel install"
import importlib.util, os, sys
import moecap.analyze
where = os.path.realpath(moecap.analyze.__file__)
assert "/site-packages/moecap/" in where, where
extra = [m for m in ("torch", "transformers", "vllm", "sglang") if importlib.util.find_spec(m)]
assert not extra, f"[analyze] installed {extra}"
EOF
  local ref
  ref=$(readme find "moecap-analyze traces/moecap-reference/batch_data.json")
  echo "== [analyze] $ref" >&2
  PATH=$a/.venv/bin:$PATH bash -euo pipefail -c "$ref" >"$work/analyze-ref.log" 2>&1 || { cat "$work/analyze-ref.log" >&2; fail "the README's reference example failed"; }
  .venv/bin/python - <<'EOF' || fail "reference mode on the shipped sample does not give the oracle's numbers"
import json, math
name = "chunked|deepseek-ai/DeepSeek-V2-Lite|H100-80GB-SXM|tp1|bf16"
case = next(c for c in json.load(open("tests/data/oracle_cases.json"))["cases"] if c["name"] == name)
assert json.load(open("traces/moecap-reference/batch_data.json")) == case["records"], "sample != oracle records"
run = json.load(open("ref/metrics.json"))["runs"][0]
got = {**run["batch_metrics"], **run["run_level"]}
# e2e_s and request_per_s need --num-requests / --total-time-s, which a batch_data.json does not hold.
wrong = {k: (got.get(k), v) for k, v in case["expected"].items() if k not in ("e2e_s", "request_per_s")
         and not (got.get(k) is v is None or (v is not None and got.get(k) is not None
                                              and math.isclose(got[k], v, rel_tol=1e-9)))}
assert not wrong, wrong
print(f"wheel-jobs: reference mode = oracle on {len(case['expected']) - 2} values", flush=True)
EOF
  # notebooks/README.md's two commands as written (the venv exists: its install adds the notebooks extra).
  local line
  while IFS= read -r line; do
    echo "== [analyze,notebooks] $line" >&2
    bash -euo pipefail -c "$line" >"$work/notebooks.log" 2>&1 || { cat "$work/notebooks.log" >&2; fail "notebooks/README.md: $line failed"; }
  done < <(readme notebooks)
  [ -s notebooks/01_tour_of_a_run.ipynb ] || fail "the notebook command wrote no .ipynb"
}

job_collect_hf() {
  local c=$work/collect
  fresh_copy "$c"
  cd "$c"
  echo "== [collect,hf] pip install torch==2.13.0 '.[collect,hf]'" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q torch==2.13.0 '.[collect,hf]' >"$work/collect-pip.log" 2>&1 || { cat "$work/collect-pip.log" >&2; fail "pip install '.[collect,hf]' failed"; }
  .venv/bin/python - <<'EOF' || fail "the [collect,hf] venv is not a plain wheel install without the analysis stack"
import importlib.util, os
import moecap.collect
assert "/site-packages/moecap/" in os.path.realpath(moecap.collect.__file__)
extra = [m for m in ("polars", "duckdb", "altair") if importlib.util.find_spec(m)]
assert not extra, f"[collect,hf] installed {extra}"
EOF
  local run
  run=$(readme find "moecap-collect run --engine hf")
  echo "== [collect,hf] $run" >&2
  rm -rf traces && mkdir traces  # only this run's files, so the check below reads nothing else
  PATH=$c/.venv/bin:$PATH bash -euo pipefail -c "$run" >"$work/collect-run.log" 2>&1 || { cat "$work/collect-run.log" >&2; fail "the README's CPU run failed"; }
  echo "== [analyze venv] moecap-analyze <the run's trace> --gpu H100 --out tiny-results/" >&2
  "$work/analyze/.venv/bin/moecap-analyze" traces/ --gpu H100 --out tiny-results/ >"$work/collect-analyze.log" 2>&1 \
    || { cat "$work/collect-analyze.log" >&2; fail "analysing the CPU run's trace failed"; }
  "$work/analyze/.venv/bin/moecap-analyze" check traces/ >"$work/collect-check.log" 2>&1 \
    || { cat "$work/collect-check.log" >&2; fail "check of the CPU run's trace failed"; }
  "$work/analyze/.venv/bin/python" - <<'EOF' || fail "the CPU run's metrics are not those of 8 requests x 32 tokens"
import json
(run,) = json.load(open("tiny-results/metrics.json"))["runs"]
assert run["model"] == "tiny-qwen2-moe", run["model"]
req = run["metrics"]["requests"]
assert (req["requests"], req["succeeded"], req["output_tokens"]) == (8, 8, 8 * 32), req
steps = run["metrics"]["steps"]["all"]
assert steps["steps"] > 0 and steps["s_mbu"] > 0, steps
print(f"wheel-jobs: CPU run {run['run_id']}: 8 requests, 256 output tokens", flush=True)
EOF
}

status=0
for job in analyze collect_hf; do
  start=$SECONDS
  if ( "job_$job" ); then result=ok; else result=FAILED; status=1; fi
  echo "wheel-jobs: $job $result in $((SECONDS - start)) s" >&2
  [ "$job" = analyze ] && [ "$result" = FAILED ] && { echo "wheel-jobs: collect_hf needs the analyze venv; skipped" >&2; break; }
done
exit $status
