#!/usr/bin/env bash
# One prepared check for a machine with one CUDA GPU (< 8 minutes), printing one summary:
#   1. the CUDA-marked tests (pytest -m cuda: bf16 training and export on the GPU, an NF4 base);
#   2. bench/scale.py at Llama-3-8B layer shapes (2 and 4 layers) in bf16, and with an NF4 base;
#   3. the demo config with 10x the steps (1,600) in bf16 on the GPU.
# Results go to bench/results/gpu_check/ (commit them). Without CUDA it stops at once.
#   bash scripts/setup.sh && bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False, or $PY has no torch): this check runs" \
       "only on a machine with a CUDA GPU and a CUDA build of torch." >&2
  exit 2
fi
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
summary=()
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record status and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log")")
}
"$PY" -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)" > "$OUT/device.txt"
step cuda_tests 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
step scale_bf16 100 "$PY" bench/scale.py --device cuda --dtype bfloat16 --layers 2 4 --batch 4 --seq 1024 \
  --steps 5 --warmup 2 --max-load 1000 --out "$OUT/scale_cuda_bf16.json"
step scale_nf4 100 "$PY" bench/scale.py --device cuda --quant nf4 --layers 2 4 --batch 4 --seq 1024 \
  --steps 5 --warmup 2 --max-load 1000 --out "$OUT/scale_cuda_nf4.json"
step demo_10x 150 "$PY" train.py --config configs/smollm2_demo.yaml --max_steps 1600 --use_cpu false --bf16 true \
  --output_dir "$OUT/demo_10x" --eval_max_windows 256
rm -rf "$OUT/demo_10x/pruned" "$OUT"/demo_10x/checkpoint-*
echo
echo "gpu_check on $(cat "$OUT/device.txt")"
printf '%s\n' "${summary[@]}"
grep -h "passed\|failed" "$OUT/cuda_tests.log" | tail -1
for f in "$OUT"/scale_cuda_*.json; do
  [ -f "$f" ] && "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], 'table4:', d.get('table4'))" "$f"
done
[ -f "$OUT/demo_10x/summary.json" ] && "$PY" -c "import json; s=json.load(open('$OUT/demo_10x/summary.json')); print('demo 10x: perplexity', round(s['perplexity_before']['perplexity'],2), '->', round(s['perplexity_after']['perplexity'],2), '| train', round(s['train_runtime_s']), 's')"
