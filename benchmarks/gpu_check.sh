#!/usr/bin/env bash
# One prepared GPU check (< 5 minutes) for a machine with a GPU; CI never runs it.
# From the repository root:   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. step throughput on a base-size random HuBERT (12 x 768): pefttune step vs HF reference loops,
#    fp32 and bf16 autocast;
# 2. several small PEFT trials sharing one GPU (what fractional `resources.gpu` gives under Ray):
#    N concurrent training processes on the same device, samples/s each and together;
# 3. if Ray is installed there: a 2-trial search with resources.gpu = 0.5.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/pefttune-gpu-check}}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

echo "== throughput, base config, fp32" | tee "$OUT/throughput.txt"
timeout 100 python3 benchmarks/throughput.py --config base --batch 8 --steps 6 --repeats 2 --device cuda 2>&1 | grep -v Warning | tee -a "$OUT/throughput.txt"
echo "== throughput, base config, bf16 autocast" | tee -a "$OUT/throughput.txt"
timeout 100 python3 benchmarks/throughput.py --config base --batch 8 --steps 6 --repeats 2 --device cuda --bf16 2>&1 | grep -v Warning | tee -a "$OUT/throughput.txt"

echo "== shared GPU: 1 vs 4 concurrent trials" | tee "$OUT/shared.txt"
for n in 1 4; do
  start=$(date +%s.%N)
  for i in $(seq "$n"); do
    timeout 90 python3 benchmarks/throughput.py --config base --batch 8 --steps 4 --repeats 2 --device cuda --bf16 \
      > "$OUT/shared_${n}_${i}.log" 2>&1 &
  done
  wait
  end=$(date +%s.%N)
  echo "$n concurrent: $(python3 -c "print(round($end - $start, 1))") s wall for $n runs" | tee -a "$OUT/shared.txt"
  grep "b-upper    pefttune" "$OUT"/shared_${n}_*.log | tee -a "$OUT/shared.txt"
done

if python3 -c "import ray, optuna, pydantic" 2>/dev/null; then
  echo "== Ray search with fractional GPUs" | tee "$OUT/ray.txt"
  timeout 120 python3 -m pefttune search src/pefttune/configs/embedded.yaml --name gpu-check 2>&1 | tail -30 | tee -a "$OUT/ray.txt"
else
  echo "Ray/Optuna/pydantic not installed on this machine: fractional-GPU Ray search skipped" | tee "$OUT/ray.txt"
fi
