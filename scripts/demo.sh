#!/usr/bin/env bash
# The main job on the embedded default: the shipped ResNet-20 trained on Fashion-MNIST, pruned
# for `cpu-ort` (this host, onnxruntime, 1 thread) to half its measured latency:
#   search (Optuna NSGA-II, 100 candidates) -> fine-tune (3 epochs, distilled from the
#   unpruned model) -> export (ONNX, TVM, torch) -> the measured report, printed as a table.
# Every step resumes: re-running it continues an interrupted study or fine-tune and skips what
# is done. Everything goes to runs/demo/ (override with STUDY=name).
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${STUDY:-demo}
WEIGHTS=autoprune/weights/resnet20-fashion-mnist.pt
if [ ! -f "$WEIGHTS" ]; then
  echo "no shipped checkpoint: training it (about 50 minutes on 2 cores)"
  autoprune train --model resnet20 --data fashion-mnist --epochs 30 --out "$WEIGHTS"
fi
start=$(date +%s)
autoprune evaluate --split test
# The shipped latency table was measured on one CPU, and a table is refused on another (it
# records the CPU's name and family): on another CPU, measure this one's own (about 20 s).
# (`predict` only reads the table, so the shipped one is never written to.)
TABLES=latency_tables
if ! autoprune predict --target-device cpu-ort > /dev/null; then
  TABLES=runs/tables
  echo "measuring this CPU's own cpu-ort table into $TABLES/ instead (the shipped one stays)"
  autoprune profile --target-device cpu-ort --tables "$TABLES" --quiet
fi
autoprune search --target-device cpu-ort --latency-budget 0.5 --searcher evolution \
  --trials 100 --study "$STUDY" --tables "$TABLES"
autoprune finetune --study "$STUDY" --epochs 3 --distill
autoprune export --study "$STUDY" --format onnx,tvm,torch
echo "main job done in $(( $(date +%s) - start )) s; everything is in runs/$STUDY/:"
echo "  candidates.jsonl, best_policy.json, pareto.json, pareto.png   the search"
echo "  finetune/best.pt                                             the fine-tuned model"
echo "  export/model.onnx, model.so, model.pt, model.pt2             the deployable models"
echo "  export/report.json, export/report.md                         the measured report"
