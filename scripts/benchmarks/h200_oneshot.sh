#!/usr/bin/env bash
# One-shot GPU benchmark of the paper's brain setting on a lent NVIDIA H200 (at most ~9 minutes there).
#
# 1. Here, on the development machine, once (the device has no network and no MONAI, nibabel, ignite,
#    fire or nilearn; .whl/ is git-ignored and travels with `carry`):
#        bash scripts/benchmarks/h200_oneshot.sh prepare
# 2. On the device, one call of the session's `run` tool:
#        run(command="bash scripts/benchmarks/h200_oneshot.sh run", carry=[".whl"], timeout_s=600)
#    It checks the mixed-precision bound on the GPU's own bf16 and TF32 tensor cores (pytest, -k cuda),
#    then runs `python -m scripts.benchmarks gpu` with B = 32 (B=... overrides it), C then MS, exact fp32 scoring
#    (PRECISION=bf16 for the reduced-precision pass), each bundle run cut at 200 s, and leaves gpu.md, gpu.json,
#    the logs and the updated docs/performance.md in $OUT. Why not the paper's B = 180 here: a loan is
#    15 minutes in all, and on an H200 the C run alone took 100 s at B = 32 (scoring grows with B^2;
#    docs/performance.md, GPU).
# 3. Back here: `python -m scripts.benchmarks gpu --render <files_at>/gpu.json --doc docs/performance.md`
#    writes the returned table into docs/performance.md (its GPU block); then flip score_precision's
#    `auto` on CUDA in scripts/mixed_precision.py only if the table shows a pass faster than fp32.
set -uo pipefail
WHEELS="monai==1.6.1 nibabel==5.4.2 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0 nilearn==0.14.1"

case "${1:-run}" in
prepare)
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    ;;
run)
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    OUT="${OUT:-bench_out/h200}"
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    {
        nvidia-smi
        python3 -c "import torch, monai, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'monai', monai.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
    } 2>&1 | tee "$OUT/machine.txt"
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/unit/test_mixed_precision.py -k cuda 2>&1 \
        | tee "$OUT/pytest_cuda.log"
    timeout 440 python3 -m scripts.benchmarks gpu --B "${B:-32}" --workers 14 --timeout_s 200 \
        --score_precision "${PRECISION:-fp32}" --precision_repeats 1 \
        --out bench_out/gpu --doc docs/performance.md 2>&1 | tee "$OUT/gpu.log"
    cp bench_out/gpu/gpu.md bench_out/gpu/gpu.json docs/performance.md "$OUT/" 2>/dev/null
    ls -la "$OUT"
    ;;
*)
    echo "usage: bash scripts/benchmarks/h200_oneshot.sh {prepare|run}" >&2
    exit 2
    ;;
esac
