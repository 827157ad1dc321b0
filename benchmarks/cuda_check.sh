#!/usr/bin/env bash
# Issue 13's GPU checks in one go, for a session that has a CUDA machine (about 10 minutes on
# one H100/H200-class GPU; budget 15 minutes of device time in all, so run it once):
#   1. the QAT step benchmark on CUDA, eager and compiled, against float and torch.ao;
#   2. dense vs 2:4 semi-structured F.linear (benchmarks/bench_semi_structured.py);
#   3. a 20-step DDP QAT smoke run on one GPU (NCCL), eager and compiled.
#
#     bash benchmarks/cuda_check.sh [OUT_DIR]      # run from the repository root
#
# Every step's output goes to OUT_DIR (default: $OUT if set, else ./cuda_check_out) and to the
# terminal; a failing step is reported and the next one still runs. Copy the numbers into
# docs/benchmarks.md.
set -u
out="${1:-${OUT:-cuda_check_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' | tee "$out/00_machine.txt"
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
print("cpu cores", os.cpu_count(), "load", os.getloadavg())
PY
status=0
run() {  # run NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee "$out/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/$name.txt"
    [ "$rc" -eq 0 ] || status=1
}
run 01_qat_step_cuda 300 python benchmarks/bench_qat_step.py --device cuda --rounds 5 --steps 20 --compile-ao --profile 15
run 02_semi_structured 120 python benchmarks/bench_semi_structured.py
run 03_ddp_smoke 120 torchrun --standalone --nproc_per_node=1 benchmarks/ddp_qat_smoke.py --steps 20
run 04_ddp_smoke_compiled 180 torchrun --standalone --nproc_per_node=1 benchmarks/ddp_qat_smoke.py --steps 20 --compile
exit $status
