#!/usr/bin/env bash
# The GPU results of the README, each stage a separate command so that it fits one run:
#
#   scripts/gpu_bench.sh tests       # the CUDA-marked tests, and the kernel tests of the select
#                                    # step, top-k, select and attend
#   scripts/gpu_bench.sh step_tests  # PDL's, the gate's, attend's and the select step's kernel tests (stops the stages after it on a failure)
#   scripts/gpu_bench.sh topk        # the top-k's kernel tests alone (stops the stages after it on a failure)
#   scripts/gpu_bench.sh engine      # the select engine's kernel tests alone (retrieval, top-k)
#   scripts/gpu_bench.sh kernels     # the top-k, attend and oracle-select kernel tests (stops the stages after it on a failure)
#   scripts/gpu_bench.sh attend_sweep  # attend's kernel configurations -> $OUT/attend_sweep.json
#   scripts/gpu_bench.sh profile     # the kernels of one PrHS decode step, with their times
#   scripts/gpu_bench.sh profile_grid  # the step's kernels at each of PROFILE_CONFIGS
#                                    # -> $OUT/profile_step.{json,txt}
#   scripts/gpu_bench.sh topk_probe  # the top-k at low retrieval rates, parts left out -> $OUT/topk_probe.json
#                                    # (TOPK_PROBE_ARGS="--shapes 1 --variants 3" or
#                                    # '--only "guess+dilate, 16 warps"': fewer)
#   scripts/gpu_bench.sh sweep       # the select engine's K pass and top-k configurations -> $OUT/engine_sweep.json
#   scripts/gpu_bench.sh pages_sweep # two-stage retrieval's page-bound and candidate kernels' configurations -> $OUT/pages_sweep.json
#   scripts/gpu_bench.sh compare     # prhs-bench compare: every policy on the evaluation model
#   scripts/gpu_bench.sh probe       # the CUDA-graphs probe alone
#   scripts/gpu_bench.sh prefill     # block-sparse PSAW prefill: CUDA tests + prhs-bench prefill
#   scripts/gpu_bench.sh latency     # prhs-bench latency, full grid -> $OUT/latency.json
#   scripts/gpu_bench.sh throughput  # prhs-bench throughput -> $OUT/throughput.json
#   BASE=dir scripts/gpu_bench.sh ab # the PrHS step of another revision's source tree (dir,
#                                    # e.g. from `git archive`) and of this one, side by side
#                                    # on this machine -> $OUT/profile_base_NAME.json, profile_new.json
#                                    # (BASE="dir1 dir2": several revisions; AB_VARIANTS=
#                                    # "nopdl:PRHS_PDL=0": this tree under other environments;
#                                    # AB_ARGS: more profile_step.py options, e.g. "--retrieval
#                                    # pages"; AB_TAG: a suffix of the JSON names)
#   scripts/gpu_bench.sh pages       # two-stage retrieval: its kernel tests, then the PrHS step
#                                    # with exact and two-stage retrieval, and Quest's step
#                                    # -> $OUT/latency_pages.json
#
# Output lands in $OUT (or ./gpu_out). Runs from outside the checkout after a regular
# install, so the source folders at its root never shadow the installed package.
set -uo pipefail
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then  # expecttest (and a newer transformers) are not in the GPU image (see README)
  python -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
fi
python -m pip install -q --no-deps --no-build-isolation "$ROOT" 2>&1 | grep -v "as the 'root' user" | tail -3
cd /tmp
# Tests in parallel where pytest-xdist is installed: their time is mostly Triton's compiles (CPU).
PAR=""
if python -c "import xdist" 2>/dev/null; then PAR="-n ${PYTEST_WORKERS:-8}"; fi
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

for stage in "$@"; do
  case "$stage" in
    tests)
      python -m pytest -q -p no:cacheprovider $PAR -m cuda "$ROOT/tests" 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -15
      python -m pytest -q -p no:cacheprovider $PAR "$ROOT/tests/test_select_step_triton.py" "$ROOT/tests/test_topk_triton.py" "$ROOT/tests/test_select_triton.py" "$ROOT/tests/test_attend_triton.py" 2>&1 | tee "$OUT/pytest_select_step.txt" | tail -15
      ;;
    step_tests)  # the gate's, attend's, the whole select step's and the timer's tests; a failure stops the stages after it
      python -m pytest -q -x -p no:cacheprovider $PAR "$ROOT/tests/test_pdl.py" "$ROOT/tests/test_gate_triton.py" "$ROOT/tests/test_attend_triton.py" "$ROOT/tests/test_select_step_triton.py" "$ROOT/tests/test_timing.py" 2>&1 | tee "$OUT/pytest_step.txt" | tail -5 || exit 1
      ;;
    topk)  # the top-k's kernel tests; a failure stops the stages after it
      python -m pytest -q -x -p no:cacheprovider "$ROOT/tests/test_topk_triton.py" 2>&1 | tee "$OUT/pytest_topk.txt" | tail -5 || exit 1
      ;;
    kernels)  # the top-k's, attend's and the oracle select's kernel tests; a failure stops the stages after it
      timeout 300 python -m pytest -q -x -p no:cacheprovider $PAR "$ROOT/tests/test_topk_triton.py" "$ROOT/tests/test_attend_triton.py" "$ROOT/tests/test_select_triton.py" 2>&1 | tee "$OUT/pytest_kernels.txt" | tail -5 || exit 1
      ;;
    engine)
      python -m pytest -q -x -p no:cacheprovider $PAR "$ROOT/tests/test_topk_triton.py" "$ROOT/tests/test_select_step_triton.py" 2>&1 | tee "$OUT/pytest_engine.txt" | tail -25
      ;;
    attend_sweep)
      python "$ROOT/scripts/attend_sweep.py" --out "$OUT/attend_sweep.json" 2>&1 | tail -20
      ;;
    profile)
      # r = 0 at B=1 (the fixed cost of a step), with the glue's default Inductor options
      # (combo kernels) and without them; r = 0.1 and r = 1 where retrievals dominate.
      python "$ROOT/scripts/profile_step.py" --batch 1 --context 32768 --budget 2048 2>&1 | grep -v Warn | tee "$OUT/profile_b1_32k_r0.txt"
      python "$ROOT/scripts/profile_step.py" --batch 1 --context 32768 --budget 2048 --glue-options '{"combo_kernels": false}' 2>&1 | grep -v Warn | tee "$OUT/profile_b1_32k_r0_nocombo.txt" | grep -E "kernels|graph"
      python "$ROOT/scripts/profile_step.py" --batch 16 --context 131072 --budget 2048 --rate 0.1 2>&1 | grep -v Warn | tee "$OUT/profile_b16_128k_r01.txt" | grep -E "kernels|graph|_kernel"
      python "$ROOT/scripts/profile_step.py" --batch 1 --context 131072 --budget 2048 --rate 1 2>&1 | grep -v Warn | tee "$OUT/profile_b1_128k_r1.txt" | grep -E "kernels|graph|_kernel"
      ;;
    profile_grid)
      CONFIGS=${PROFILE_CONFIGS:-1:32768:0,1:32768:0.1,16:32768:0.1,1:131072:1,16:131072:1}
      python "$ROOT/scripts/profile_step.py" --configs "$CONFIGS" --out "$OUT/profile_step.json" \
        2>&1 | grep -v -i "warn" > "$OUT/profile_step.txt"
      grep "step in" "$OUT/profile_step.txt"
      ;;
    topk_probe)
      # eval: TOPK_PROBE_ARGS may quote variant names (--only "guess+dilate, 16 warps")
      eval "python \"\$ROOT/scripts/topk_probe.py\" --timeline ${TOPK_PROBE_ARGS:-} --out \"\$OUT/topk_probe.json\"" 2>&1 | grep -v "top-k probe:"
      ;;
    sweep)
      python "$ROOT/scripts/engine_sweep.py" --out "$OUT/engine_sweep.json" 2>&1 | grep -v "engine sweep:"
      ;;
    pages_sweep)
      python "$ROOT/scripts/pages_sweep.py" --out "$OUT/pages_sweep.json" 2>&1 | grep -v "pages sweep:"
      ;;
    compare)
      prhs-bench compare --model "$ROOT/models/substrate" --examples 2 --workers 4 --out "$OUT/compare_h200.json" 2>&1 | tail -60
      ;;
    probe)
      python "$ROOT/scripts/cuda_graphs_probe.py" --out "$OUT/cuda_graphs_probe.json" 2>&1 | tail -40
      ;;
    prefill)
      python -m pytest -q -p no:cacheprovider -m cuda "$ROOT/tests/test_window_prefill_flex.py" 2>&1 | tee "$OUT/pytest_prefill_cuda.txt" | tail -15
      prhs-bench prefill --no-progress --out "$OUT/prefill.json" 2>&1 | tail -30
      ;;
    latency)
      # shellcheck disable=SC2086  # LATENCY_ARGS: extra options, e.g. --no-flex
      # LATENCY_OUT: the JSON's name under $OUT (a grid split over several runs)
      prhs-bench latency --no-progress ${LATENCY_ARGS:-} --out "$OUT/${LATENCY_OUT:-latency.json}" 2>&1 | tail -60
      ;;
    throughput)
      # shellcheck disable=SC2086  # THROUGHPUT_ARGS: extra options, e.g. --configs inductor_gqa,prhs
      prhs-bench throughput ${THROUGHPUT_ARGS:-} --out "$OUT/throughput.json" 2>&1 | tail -40
      ;;
    ab)
      # BASE: source trees of other revisions (none: only this tree and its AB_VARIANTS)
      # PROFILE_CONFIGS: batch:context:rate triples
      CONFIGS=${PROFILE_CONFIGS:-1:32768:0,16:32768:0,16:131072:0,1:32768:0.1,1:131072:1,16:131072:1}
      for base in ${BASE:-}; do
        name=$(basename "$base" | tr -c 'A-Za-z0-9_\n-' '_')
        python -m pip install -q --no-deps --no-build-isolation --target "/tmp/prhs_$name" "$ROOT/$base" 2>&1 | grep -v "as the 'root' user" | tail -3
        echo "$base:"
        PYTHONPATH="/tmp/prhs_$name" python "$ROOT/scripts/profile_step.py" --configs "$CONFIGS" ${AB_ARGS:-} --quiet \
          --out "$OUT/profile_base_$name${AB_TAG:-}.json" 2>&1 | grep "step in"
      done
      # AB_VARIANTS="name:VAR=value,VAR=value ...": this tree again under those environment
      # variables (e.g. nopdl:PRHS_PDL=0) -> $OUT/profile_variant_NAME.json
      for variant in ${AB_VARIANTS:-}; do
        vname=${variant%%:*}
        echo "this tree with ${variant#*:}:"
        env $(echo "${variant#*:}" | tr ',' ' ') python "$ROOT/scripts/profile_step.py" --configs "$CONFIGS" \
          ${AB_ARGS:-} --quiet --out "$OUT/profile_variant_$vname${AB_TAG:-}.json" 2>&1 | grep "step in"
      done
      echo "this tree:"
      python "$ROOT/scripts/profile_step.py" --configs "$CONFIGS" ${AB_ARGS:-} \
        --out "$OUT/profile_new${AB_TAG:-}.json" 2>&1 | grep -v -i "warn" > "$OUT/profile_new${AB_TAG:-}.txt"
      grep "step in" "$OUT/profile_new${AB_TAG:-}.txt"
      ;;
    pages)
      python -m pytest -q -x -p no:cacheprovider "$ROOT/tests/test_pages_triton.py" 2>&1 | tee "$OUT/pytest_pages.txt" | tail -8 || exit 1
      prhs-bench latency --no-progress --no-flex --retrievals exact,pages,quest --step-rates 0,0.1,1 \
        --budgets 2048 ${LATENCY_ARGS:-} --out "$OUT/latency_pages.json" 2>&1 | tail -30
      python "$ROOT/scripts/profile_step.py" --batch 16 --context 131072 --budget 2048 --rate 1 --retrieval pages 2>&1 | grep -v Warn | tee "$OUT/profile_pages_b16_128k_r1.txt" | grep -E "kernels|graph|_kernel"
      ;;
    *)
      echo "unknown stage $stage (tests, topk, kernels, engine, attend_sweep, topk_probe, profile, profile_grid, ab, sweep, pages_sweep, compare, probe, prefill, latency, throughput, pages)"; exit 2;;
  esac
done
