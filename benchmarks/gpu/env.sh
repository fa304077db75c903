# Source on the GPU machine from the repository root: puts this checkout on PYTHONPATH as the `moecap`
# namespace (collect/ -> moecap.collect, schemas/ -> moecap.schemas) without pip, and runs offline.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
_shim=/tmp/moecap-shim/moecap
mkdir -p "$_shim"
for _pkg in collect schemas analyze; do ln -sfn "$PWD/$_pkg" "$_shim/$_pkg"; done
export PYTHONPATH="/tmp/moecap-shim:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
