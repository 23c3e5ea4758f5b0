#!/usr/bin/env bash
# Installs everything autoprune needs on a fresh machine. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
# torch first, pinned: this takes the local CPU wheel. Anything that pulled torch in as a
# dependency before this line would fetch a multi-GB CUDA build.
$PIP install -q torch==2.13.0
$PIP install -q -e ".[dev]"
# Debian's packages: the Fashion-MNIST files, and a PostgreSQL server for the tests of
# studies shared through `--storage postgresql://...` (they start a throwaway one)
APT=()
[ -d /usr/share/datasets/fashion-mnist ] || APT+=(dataset-fashion-mnist)
command -v initdb > /dev/null || ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1 \
  || APT+=(postgresql)
if [ "${#APT[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${APT[@]}"
fi
