#!/usr/bin/env bash
# Everything the GPU machine should confirm, in one go: versions, the whole test suite
# (CUDA-marked tests included), and the examples on CUDA. Output lands in $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# expecttest is not in the GPU image: carried as a wheel in .whl (see README, GPU section)
if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
fi
# A regular (not editable) install, and every command run from outside the checkout, so the
# source folders at its root never shadow the installed package.
ROOT=$(pwd)
python -m pip install -q --no-deps --no-build-isolation "$ROOT" 2>&1 | grep -v "as the 'root' user" | tail -3
cd /tmp
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python -m pytest -q -p no:cacheprovider -n 8 "$ROOT/tests" "$@" 2>&1 | tee "$OUT/pytest.txt" | tail -30
python "$ROOT/examples/generate.py" --device cuda --dtype bfloat16 --prompt-len 2048 --new-tokens 32 --budget 256 2>&1 | tee "$OUT/generate_cuda.txt" | tail -8
