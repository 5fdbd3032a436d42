#!/usr/bin/env bash
# The standing GPU check (issue 32), as ONE device call that ends within 8 minutes on an H100:
#   here, once:   make gpu-kit     (the wheels the GPU image lacks, into .whl/, git-ignored)
#   on the GPU:   device run, command "COMMIT=<sha> bash scripts/gpu_check.sh", carry [".whl"], timeout_s 540
# Under $OUT: env.txt (card, torch, the key packages' versions), cuda_tests.log (the CUDA-only tests:
# varlen attention, DeviceCopies), bench_gpu.md/.log (make bench-gpu, every row, eager: its packed and
# padded gumbel rows are what boundary.image_layout=auto's CUDA choice is read from),
# bench_gpu_compile.md/.log (--compile: vanilla, gumbel in its default layout, fixed k=4) and
# summary.txt (each phase's exit status; printed last). Each phase has its own time limit, a bench's
# table is rewritten after every row, and the call exits non-zero when any phase failed, timed out
# (124) or, on a GPU, skipped a CUDA test.
# SMOKE=1 runs the same phases on the CPU at toy sizes: here, to check the script and the kit.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-outputs/gpu_check}
py=${PYTHON:-python3}
smoke=${SMOKE:-0}
mkdir -p "$out"
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONUNBUFFERED=1  # the image's pytest plugins: none is needed
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fastclip-kit .whl/*.whl >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 2; }
    rm -f "$out/pip.log"  # installed: $OUT brings back 8 files at most
    export PYTHONPATH="/tmp/fastclip-kit${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$smoke" = 1 ]; then
    bench=(--device cpu --encoder vit_tiny --batch 4 --steps 1 --warmup 0 --workers 0); limits=(600 600 600)
else
    bench=(--steps 20 --warmup 5); limits=(60 270 150)  # seconds: CUDA tests, eager bench, compiled bench
fi
{
    date -u
    echo "commit: ${COMMIT:-unknown (pass COMMIT=<sha>: .git does not travel)}"
    nvidia-smi -L 2>/dev/null
    "$py" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|timm|numpy|huggingface.hub|open.clip.torch|triton) '
} 2>&1 | tee "$out/env.txt"
# before any phase: the kit importable and, on a GPU, the GPU visible (else every phase fails alike)
preflight="import torch, open_clip, hydra, webdataset, fastclip.bench.gpu
assert torch.cuda.is_available() or '$smoke' == '1', 'no CUDA device visible'
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
timeout -k 10 60 "$py" -c "$preflight" 2>&1 | tee -a "$out/env.txt" || { echo "preflight failed: see env.txt"; exit 2; }
status=()
phase() {  # name, limit, command...: runs it under its limit, its output to $out/<name>.log
    local name=$1 limit=$2; shift 2
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=$?
    status+=("$name $rc$([ "$rc" = 124 ] && echo ' (timed out)')")
}
phase cuda_tests "${limits[0]}" "$py" -m pytest -q -rs -p no:cacheprovider tests/test_packed_varlen.py \
    tests/test_device_copies.py
if [ "$smoke" != 1 ] && grep -q "skipped" "$out/cuda_tests.log"; then
    status+=("cuda_tests: a CUDA test skipped on the GPU machine")
fi
phase bench_gpu "${limits[1]}" "$py" -m fastclip.bench.gpu "${bench[@]}" --out "$out/bench_gpu.md"
phase bench_gpu_compile "${limits[2]}" "$py" -m fastclip.bench.gpu "${bench[@]}" --compile --only gumbel,fixed \
    --out "$out/bench_gpu_compile.md"
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
! grep -qvE ' 0$' "$out/summary.txt"
