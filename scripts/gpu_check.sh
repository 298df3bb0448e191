#!/usr/bin/env bash
# Everything the GPU machine should confirm, in one go: versions, the whole test suite
# (CUDA-marked tests included), and the examples on CUDA. Output lands in $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# expecttest is not in the GPU image: carried as a wheel in .whl (see README, GPU section)
if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
fi
pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -2
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python -m pytest -q -p no:cacheprovider -n 8 "$@" 2>&1 | tee "$OUT/pytest.txt" | tail -30
python examples/generate.py --device cuda --dtype bfloat16 --prompt-len 2048 --new-tokens 32 --budget 256 2>&1 | tee "$OUT/generate_cuda.txt" | tail -8
