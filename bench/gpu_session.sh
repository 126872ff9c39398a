#!/usr/bin/env bash
# Everything only a GPU can show, in one go, for a session that is lent one (device tool):
# the CUDA and Triton kernels' correctness against the references, then their speed.
# Usage (repository root, on the GPU machine):  bash bench/gpu_session.sh [OUTDIR]
# Writes OUTDIR/gpu_results.md (default bench/) to be merged into bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu_info.txt"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 cmake ninja setuptools wheel
fi
HYFORGET_CUDA_ARCHS=90 .venv/bin/pip install -q --no-build-isolation '.[test]'
.venv/bin/python -c "import hyforget_fast as hf; print(hf.backends())"
# Correctness first: with a GPU the cuda/triton cases of every kernel test run (no skips).
.venv/bin/pytest tests -q -rs 2>&1 | tee "$OUT/gpu_pytest.txt"
{
  echo "# GPU results ($(head -2 "$OUT/gpu_info.txt" | tail -1), $(date -u +%F))"
  .venv/bin/python bench/bench_tokenize.py --device cuda | sed -n '/^### /,$p'
  .venv/bin/python bench/bench_class_metrics_gpu.py
  .venv/bin/python bench/bench_collect.py --preset mnist10 --runs 4096 --threads --repeats 2 --device cuda
  # DiHyFo (bench/RESULTS.md §5): training step, ours (bf16 autocast, SDPA, on-device batches) vs G.pt's way
  # (fp32, per-token loops, manual attention, per-sample CPU loader), same weights, MFU vs bf16 GEMM
  for m in dihyfo1 dihyfo2; do
    .venv/bin/python bench/bench_train_step.py --model $m --preset paper --spec mnist4 --batch 2048 \
      --repeats 5 --device cuda | sed -n '/^### /,$p'
  done
  # sampling latency, K=256 networks with DDIM-50 (target < 1 s for the paper preset), + scoring them
  .venv/bin/python bench/bench_sample.py --preset paper --spec mnist4 --ks 256 --samplers ddim50 --score \
    --device cuda | sed -n '/^### /,$p'
  .venv/bin/python bench/bench_sample.py --preset tiny --spec mnist4 --ks 256 --samplers ddim50 --score \
    --device cuda | sed -n '/^### /,$p'
} 2>&1 | tee "$OUT/gpu_results.md"
