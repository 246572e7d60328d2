#!/usr/bin/env bash
# The checks that need a GPU, as one script for a short lease of a GPU machine:
#   tests          the test suite on CUDA (kernel, layer, model, expert-parallel, import tests;
#                  the trainer's tests are skipped where hydra/datasets are not installed)
#   layer_eager    the layer benchmark, eager, float32 and bfloat16, vs transformers' grouped_mm
#   layer_compiled the same in bfloat16, ours and dense compiled (the peer eager, as its users run it)
#   layer_graphs   the same compiled with CUDA graphs (mode="reduce-overhead")
#   gemms          the experts alone vs dense in bfloat16: the ceiling of the layer's %dense
#   kernels        each grouped GEMM alone: grouped_mm, our Triton kernels, dense mm
#   profile        torch.profiler tables of the compiled layer (E=32, k=1) and its dense twin
#   train_eager    bench_train.py on gpu_1b in bfloat16, eager
#   train_compiled the same with every block compiled (train.compile's default on CUDA)
#
#   bash scripts/gpu_checks.sh OUTDIR [STEP...]     (all steps when none is named)
#   TESTS="tests/layers tests/kernels" bash scripts/gpu_checks.sh OUTDIR tests
#
# Each step runs under a time limit and logs to OUTDIR/STEP.log (JSON results beside it); a
# failing step does not stop the next one.
set -u
out=${1:?usage: gpu_checks.sh OUTDIR [STEP...]}
shift
steps=${*:-tests gemms layer_eager layer_compiled layer_graphs profile train_eager train_compiled}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
shape=(--tokens 16384 --d-model 1024 --d-ff 2048 --backends auto --reps 10 --warmup 3)

run() {  # run NAME LIMIT_S COMMAND...: log to OUTDIR/NAME.log, print its tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    rc=$?
    echo "== $name rc=$rc in $((SECONDS - start))s"
    tail -n 30 "$out/$name.log"
    return $rc
}

{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    $py -c "import torch, triton, transformers as t; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', t.__version__)"
    date -u
    $py -m pip install -q --no-deps --no-build-isolation -e . && echo "installed moe-train"
} >>"$out/env.txt" 2>&1
cat "$out/env.txt"

for step in $steps; do
    case $step in
    tests)
        # Two threads a process: the expert-parallel tests start 4 processes per test.
        OMP_NUM_THREADS=2 run tests 170 $py -m pytest -q -n 8 -p no:cacheprovider \
            --timeout 120 --tb=short -rf ${TESTS:-tests} ;;
    layer_eager)
        run layer_eager 150 $py scripts/bench_moe_layer.py "${shape[@]}" \
            --peers transformers_grouped_mm --json "$out/layer_eager.json" ;;
    layer_compiled)
        run layer_compiled 170 $py scripts/bench_moe_layer.py "${shape[@]}" --dtypes bfloat16 \
            --peers transformers_grouped_mm --compile default --json "$out/layer_compiled.json" ;;
    layer_graphs)
        run layer_graphs 150 $py scripts/bench_moe_layer.py "${shape[@]}" --dtypes bfloat16 \
            --peers "" --compile reduce-overhead --json "$out/layer_graphs.json" ;;
    kernels)
        run kernels 150 $py scripts/bench_gemm_kernels.py --json "$out/kernels.json" ;;
    gemms)
        run gemms 90 $py scripts/bench_expert_gemms.py "${shape[@]:0:6}" --dtypes bfloat16 \
            --json "$out/gemms.json" ;;
    profile)
        for what in "" --dense; do
            run "profile${what:+_dense}" 60 $py scripts/profile_moe_layer.py "${shape[@]:0:6}" \
                --experts 32 --dtype bfloat16 --compile default --rows 30 $what
        done ;;
    train_eager | train_compiled)
        compile=$([ "$step" = train_eager ] && echo false || echo true)
        run "$step" 150 $py scripts/bench_train.py --presets gpu_1b --dtypes bfloat16 \
            --steps 5 --compile "$compile" --json "$out/$step.json" ;;
    *) echo "unknown step $step" ;;
    esac
done
