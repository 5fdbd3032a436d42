#!/usr/bin/env bash
# The standing GPU check (issue 32), as ONE device call that ends within 8 minutes on an H100:
#   here, once:   make gpu-kit     (the pure-Python wheels the GPU image lacks, into .whl/, git-ignored)
#   on the GPU:   device run, command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 540
# Under $OUT it writes env.txt (card, torch), cuda_tests.log (the CUDA-only tests: varlen attention,
# DeviceCopies), bench_gpu.md/.log (make bench-gpu, every row: the packed and padded DTP rows are
# what boundary.image_layout=auto's CUDA choice is read from) and bench_gpu_compile.md/.log
# (--compile, vanilla and the two DTP rows). Each phase has its own time limit, so a slow phase costs
# itself only; a bench's log keeps each row as it finishes.
# SMOKE=1 runs the same phases on the CPU at toy sizes: here, to check the script and the kit.
set -uo pipefail
out=${OUT:-outputs/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fastclip-kit .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/fastclip-kit
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
    bench=(--device cpu --encoder vit_tiny --batch 4 --steps 1 --warmup 0 --workers 0); limits=(600 600 600)
else
    bench=(); limits=(60 270 150)  # seconds: CUDA tests, eager bench, compiled bench
fi
{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "commit: not in this copy (the note names it)"
    nvidia-smi -L 2>/dev/null
    $py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|',
            torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} 2>&1 | tee "$out/env.txt"
timeout "${limits[0]}" $py -m pytest -q -rs -p no:cacheprovider tests/test_packed_varlen.py \
    tests/test_device_copies.py 2>&1 | tee "$out/cuda_tests.log"
timeout "${limits[1]}" $py -m fastclip.bench.gpu "${bench[@]}" --out "$out/bench_gpu.md" 2>&1 \
    | tee "$out/bench_gpu.log"
timeout "${limits[2]}" $py -m fastclip.bench.gpu "${bench[@]}" --compile --only gumbel,fixed \
    --out "$out/bench_gpu_compile.md" 2>&1 | tee "$out/bench_gpu_compile.log"
