#!/usr/bin/env bash
# The one-step GPU bench (orchestrator/gpu_bench.py) on a bare GPU machine: PyTorch installed, no network,
# no Ray, no virtual environment. Wheels carried in <repo>/.whl (omegaconf; its antlr4 runtime is vendored)
# are installed into a temporary folder, the checkout is made importable as `bioplaus`, and a data root
# carried in <repo>/.data is used when there is one (else the bench times on synthetic data only).
#   usage: cluster/bench-gpu.sh OUT_DIR [gpu_bench options, e.g. --only packing]
set -euo pipefail
out=${1:?usage: cluster/bench-gpu.sh OUT_DIR [gpu_bench options]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if compgen -G "$repo/.whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$repo"/.whl/*.whl
fi
ln -s "$repo" "$site/bioplaus"
if [ -z "${BIOPLAUS_DATA:-}" ] && [ -d "$repo/.data" ]; then
  export BIOPLAUS_DATA="$repo/.data"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
cd "$repo"
"$py" -m bioplaus.orchestrator.gpu_bench --out "$out" "$@"
