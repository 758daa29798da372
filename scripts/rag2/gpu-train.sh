#!/usr/bin/env bash
# One GPU call (<= 10 min) of the second test model's training (scripts/rag2/README.md).
#   bash scripts/rag2/gpu-train.sh --phase pretrain --budget 540
#   bash scripts/rag2/gpu-train.sh --phase pretrain+rag --budget 540 --split 250    # both in one call
#   bash scripts/rag2/gpu-train.sh --phase rag --budget 540 --export                 # last call: export
#   bash scripts/rag2/gpu-train.sh --phase rag --budget 540 --init-from .devcarry/resume   # machine was lost
#   --rag-seconds N: the rag phase's schedule length (train.py --phase-seconds of the rag runs only)
# Carry (prep.sh outputs): .devcarry/rag2/tokenizer .devcarry/rag2/corpus.u16.xz .devcarry/rag2/passages-train.jsonl.gz
# (22 MB), with --export also .devcarry/rag2/eval (14 MB), with --init-from that folder.
# Resumes from /var/tmp/redknot-ckpt-rag2/ckpt.pt when it exists (the GPU machine keeps ignored files while it
# stays warm: call again within its warm window).  Writes to $OUT: train_log_<phase>.txt, results_<phase>.json,
# and (unless --no-pack) the weights as byte-plane xz shards + model_small_files.tar (scripts/rag2/unpack.py
# restores the HF folder; carry that folder, shards still .bp.xz, as --init-from DIR if the machine was lost).
# With --export also HF parity + greedy eval on the eval sets, and the model card skeleton in the tar.
# Extra arguments after -- go to train.py (e.g. -- --phase-seconds 400 --lr 1e-3).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/rag2_out}"
mkdir -p "$OUT"
phase=pretrain budget=540 split=250 export="" init="" packw=1 rag_seconds=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --phase) phase="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --split) split="$2"; shift 2 ;;
    --export) export=1; shift ;;
    --no-pack) packw=""; shift ;;
    --init-from) init="$2"; shift 2 ;;
    --rag-seconds) rag_seconds="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
D=.devcarry/rag2
for f in tokenizer/tokenizer.json passages-train.jsonl.gz; do  # the corpus: train.py says when it needs it
  [ -e "$D/$f" ] || { echo "missing $D/$f: carry .devcarry/rag2 (bash scripts/rag2/prep.sh makes it)" >&2; exit 2; }
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0]); import tokenizers; print("tokenizers", tokenizers.__version__)' || true
[ -e /var/tmp/redknot-ckpt-rag2/ckpt.pt ] && echo "checkpoint present: $(python3 -c 'import torch; s=torch.load("/var/tmp/redknot-ckpt-rag2/ckpt.pt", map_location="cpu")["state"]; print(s["phase"], "step", s["step"], "phase_time", round(s["phase_time"]))')" || echo "no checkpoint"

t0=$(date +%s)
run() {  # run PHASE BUDGET [train.py args...]
  local ph="$1" b="$2"; shift 2
  local args=(--phase "$ph" --time-budget-s "$b" --resume --out "$OUT")
  [ -n "$init" ] && [ ! -e /var/tmp/redknot-ckpt-rag2/ckpt.pt ] && args+=(--init-from "$init")
  [ "$ph" = rag ] && [ -n "$rag_seconds" ] && args+=(--phase-seconds "$rag_seconds")
  timeout $((${b%.*} + 30)) python3 scripts/rag2/train.py "${args[@]}" "$@" "${extra[@]}" 2>&1 | tee "$OUT/train_log_${ph}.txt"
}
# the call's last run always sends the weights back (xz shards + small-file tar, ~38 MB) unless --no-pack:
# the GPU machine stays warm only ~30 s after a call, and then the checkpoint there is gone
exp_args=()
[ -n "$packw" ] && exp_args=(--pack "$OUT")
[ -n "$export" ] && exp_args+=(--export)
case "$phase" in
  pretrain) run pretrain "$budget" "${exp_args[@]}" ;;
  rag) run rag "$budget" "${exp_args[@]}" ;;
  pretrain+rag)
    run pretrain "$split"
    left=$(( budget - ($(date +%s) - t0) ))
    run rag "$left" "${exp_args[@]}" ;;
  *) echo "bad phase $phase" >&2; exit 2 ;;
esac
ls -la "$OUT"
