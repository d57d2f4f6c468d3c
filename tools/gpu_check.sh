#!/usr/bin/env bash
# The GPU check (docs/gpu_check.md): on a machine with one NVIDIA GPU and CUDA PyTorch,
#
#     bash tools/gpu_check.sh OUTDIR [flags of `python -m bench.gpu_check run`]
#
# runs the torch runtime with the embedded model on CUDA, a full-width 49B layer slice's decode
# bandwidth and nemotron-serve end to end on CUDA, each part within its time budget (under
# 8 minutes in all, offline), and writes OUTDIR/report.md and OUTDIR/report.json. The exit code
# is 0 only when every part passed. PYTHON picks the interpreter (default: the repository's
# .venv, else python3); the repository is put on PYTHONPATH, so an uninstalled checkout works.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bash tools/gpu_check.sh OUTDIR [--device cuda:N] [--gguf FILE] [...]" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$python" -m bench.gpu_check run --out "$out" "$@"
