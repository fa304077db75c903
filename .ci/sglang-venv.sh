#!/usr/bin/env bash
# The virtual environment the SGLang adapter's tests run in: the REAL SGLang classes on a CPU-only host.
#
#   bash .ci/sglang-venv.sh                 # create (or reuse) it; prints its python
#   bash .ci/sglang-venv.sh test [ARGS…]    # run tests/engines_sglang against SGLang 0.5.23, then 0.5.16
#
# SGLang's wheels are installed with --no-deps beside torch 2.14.1 + torchvision 0.29.1 (CUDA builds from
# this host's pip cache; their Python classes run on the CPU) and a pinned set of pure-Python dependencies,
# installed with --no-deps too so nothing is resolved. SGLang 0.5.16 (with the transformers 5.12.1 /
# tokenizers 0.22.2 it needs) lives in its own folder and shadows 0.5.23 through PYTHONPATH, so one torch
# serves both releases. Cached under ~/.cache/moecap (or $MOECAP_SGLANG_VENV_CACHE), keyed by this file's
# hash: a warm run only re-installs moecap (editable, no deps). The main venv never gets SGLang.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
NEWEST=0.5.23
OLDEST=0.5.16
cache=${MOECAP_SGLANG_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moecap}
key=$(sha256sum "$0" | cut -c1-12)
venv=$cache/sglang-venv-$key
py=$venv/bin/python
pipq() { # quiet pip; its output is shown only when it fails
  local log
  log=$(mktemp)
  if ! "$py" -m pip install -q --disable-pip-version-check --no-input "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

build() {
  echo "sglang-venv: building $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  pipq --upgrade "pip>=24"
  pipq torch==2.14.1 torchvision==0.29.1
  lock=$(mktemp)
  cat >"$lock" <<'LOCK'
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
apache-tvm-ffi==0.1.15.post2
attrs==26.1.0
blake3==1.0.11
cachetools==8.0.1
cbor2==6.3.0
certifi==2026.10.18
charset-normalizer==3.5.2
click==8.5.1
cloudpickle==3.1.2
compressed-tensors==0.20.1
dill==0.4.1
einops==0.8.2
fastapi==0.165.0
filelock==4.3.2
frozenlist==1.8.0
fsspec==2026.9.0
gguf==0.19.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpcore2==2.16.2
httpx==0.28.1
httpx2==2.16.2
huggingface_hub==1.33.0
idna==3.20
iniconfig==2.3.1
ipython==9.18.1
Jinja2==3.1.6
jiter==0.19.0
llguidance==1.7.6
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
mpmath==1.3.0
msgspec==0.22.0
multidict==7.2.1
networkx==3.6.1
numpy==2.4.6
openai==3.54.0
opentelemetry-api==1.45.2
orjson==3.13.0
oss-harmony==0.0.11
packaging==26.3
partial-json-parser==0.2.1.1.post7
pillow==13.0.0
pluggy==1.7.0
prometheus_client==0.26.0
propcache==0.5.4
psutil==7.2.2
py-cpuinfo==9.0.0
pyarrow==26.0.1
pybase64==1.5.1
pydantic==2.14.3
pydantic_core==2.50.4
Pygments==2.21.0
pytest==9.2.0
pytest-timeout==2.4.0
PyYAML==6.0.3
pyzmq==27.3.0
regex==2026.11.15
requests==2.34.2
rich==15.0.0
safetensors==0.8.0
sentencepiece==0.2.3
setproctitle==1.3.8
shellingham==1.5.4
sniffio==1.3.1
starlette==1.10.0
sympy==1.14.0
tokenizers==0.23.2
tqdm==4.70.1
traitlets==5.16.1
transformers==5.19.0
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.55.0
uvloop==0.23.0
xgrammar==0.2.8
yarl==1.25.1
LOCK
  pipq --no-deps -r "$lock"
  rm -f "$lock"
  pipq --no-deps "sglang==$NEWEST"
  pipq --no-deps --target "$venv/sglang-$OLDEST" "sglang==$OLDEST" transformers==5.12.1 tokenizers==0.22.2
  "$py" -W ignore -c "import sglang.srt.model_executor.model_runner, sglang.srt.plugins" >/dev/null 2>&1 \
    || { echo "sglang-venv: SGLang $NEWEST does not import in $venv" >&2; exit 1; }
  touch "$venv/.complete"
}

[ -f "$venv/.complete" ] || build
# The checkout moves between CI runs: point the editable install (and its sglang.srt.plugins entry point)
# at this one.
pipq --no-deps --no-build-isolation -e "$ROOT"

if [ "${1:-}" != "test" ]; then
  echo "$py"
  exit 0
fi
shift
status=0
for version in "$NEWEST" "$OLDEST"; do
  extra=""
  [ "$version" = "$OLDEST" ] && extra="$venv/sglang-$OLDEST"
  echo "== tests/engines_sglang against SGLang $version" >&2
  PYTHONPATH=$extra MOECAP_EXPECT_SGLANG=$version "$py" -m pytest -q -p no:cacheprovider tests/engines_sglang "$@" || status=1
done
exit $status
