#!/usr/bin/env bash
# The prepared GPU check (issue 18): one short script for a machine with one CUDA GPU, run from the repository root
# with the project and its offline assets installed (README "Install"). About 5 minutes on one H100/H200-class GPU.
# Everything it prints goes into the closing note; results land under ${OUT:-gpu_check_out}.
#
#   bash benchmarks/gpu_check.sh
#
# 1. SmolLM2 compression on CUDA (slm, slm-plus) in bf16 and fp32, with the quality check;
# 2. the cost of the slm pass against the slow loop that follows the official SLM.py, on CUDA (the ">= 5x faster"
#    target of the slm pass, unmeasured on a GPU so far);
# 3. slm bench (latency/throughput) of dense vs compressed on CUDA;
# 4. the 7 zero-shot tasks at a small limit through lm_eval --model slm on CUDA.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OPTIMUM_SLM_QUIET=1
step() { echo; echo "=== $* ($(date +%T))"; }
run() { local limit=$1; shift; timeout "$limit" "$@"; local rc=$?; [ $rc -eq 0 ] || echo "!!! exit $rc: $*"; return 0; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python -c "import torch, transformers, optimum_slm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'transformers', transformers.__version__, 'optimum-slm', optimum_slm.__version__)"

step "compress on CUDA: slm (faithful) and slm-plus, bf16 and fp32"
for dtype in bfloat16 float32; do
  for method in slm slm-plus; do
    run 240 slm compress --model smollm2-135m --device cuda --dtype "$dtype" --method "$method" --ratio 0.2 \
      --no-cache --overwrite --output "$OUT/$method-$dtype" 2>&1 | grep -v "^\s*$" | tail -6
  done
done
# plans across dtypes: similarities and fits run in fp32 either way, so windows should agree; maps may differ slightly
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for method in ("slm", "slm-plus"):
    try:
        a, b = (json.load(open(f"{out}/{method}-{d}/slm_plan.json")) for d in ("bfloat16", "float32"))
        print(method, "same ops across bf16/fp32:", [s["ops"] for s in a["stages"]] == [s["ops"] for s in b["stages"]])
    except OSError as exc:
        print(method, "missing:", exc)
PY

step "slm pass vs the official loop on CUDA (benchmarks/slm_cost.py)"
run 300 python benchmarks/slm_cost.py --device cuda --thresholds 0.72 --target-ratios "" --output "$OUT/slm_cost_cuda.md"
cat "$OUT/slm_cost_cuda.md" 2>/dev/null | head -20

step "slm bench on CUDA: dense vs slm-plus"
run 240 slm bench --model smollm2-135m --compare "$OUT/slm-plus-bfloat16" --device cuda --dtype bfloat16 \
  --batch-sizes 1,16 --new-tokens 128

step "7 tasks at limit 50 through lm_eval --model slm on CUDA"
run 300 lm_eval --model slm --model_args base=smollm2-135m,plan="$OUT/slm-plus-float32/slm_plan.json" \
  --tasks slm_commonsense7 --include_path "$(python -m lm_eval_slm.tasks)" --device cuda --batch_size 32 --limit 50 \
  2>&1 | tail -15
step "done"
