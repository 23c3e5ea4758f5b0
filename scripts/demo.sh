#!/usr/bin/env bash
# The main job on the embedded default: the shipped ResNet-20 trained on Fashion-MNIST.
# (Later stages of the pipeline are added here as they land.)
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=autoprune/weights/resnet20-fashion-mnist.pt
if [ ! -f "$WEIGHTS" ]; then
  echo "no shipped checkpoint: training it (about 50 minutes on 2 cores)"
  autoprune train --model resnet20 --data fashion-mnist --epochs 30 --out "$WEIGHTS"
fi
autoprune space
autoprune evaluate --split test
autoprune measure --target-device cpu-ort
