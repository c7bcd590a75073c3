#!/usr/bin/env bash
# Issue 3's GPU measurements as one prepared run (about 6 minutes on an H100; give it timeout_s 540).
#   here:   make setup && bash benchmarks/device_wheels.sh
#   there:  device tool run, carry [".whl"]:  bash benchmarks/device_check.sh
# Prints (1) the GPU, (2) the 512T training step at batch 256, ours vs the straightforward baseline,
# with the rectifier in bf16 and in fp32, (3) a real `revq-pipe train` of the 512T preset (bf16) for
# 2 epochs over N synthetic latents held on the GPU, its samples/s projected to 100 epochs over the
# 1,281,167 ImageNet train latents (the target: under 2 hours), (4) the CUDA-only tests, (5) issue 11's
# online (JPEG -> DC-AE f32c32 encoder -> step) vs cached (step on resident latents) training at batches
# ONLINE_BATCHES (its JPEGs come from scikit-image's photographs: .whl must hold a scikit-image wheel).
# A test of this script on a CPU (small sizes; EXTRA_SET holds more --set overrides for the train run):
#   DEVICE=cpu N=4096 BATCH=8 STEPS=1 ONLINE_BATCHES=1 \
#     EXTRA_SET="quantizer.codebook_size=256 rectifier.width=64 rectifier.depth=1" \
#     PY=.venv/bin/python bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda} N=${N:-131072} BATCH=${BATCH:-256} STEPS=${STEPS:-30} PY=${PY:-python3} EXTRA_SET=${EXTRA_SET:-}
ONLINE_BATCHES=${ONLINE_BATCHES:-64,256}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The checkout is not installed there: expose its folders as revq_pipe.*, as pyproject.toml maps them.
mkdir -p "$work/src/revq_pipe"
for part in pipeline cache stages demo; do ln -s "$PWD/$part" "$work/src/revq_pipe/$part"; done
export PYTHONPATH=$work/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
cli() { $PY -m revq_pipe.stages.cli "$@"; }

echo "== (1) device"
if [ "$DEVICE" = cuda ]; then nvidia-smi -L; fi
$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

echo "== (2) training step, 512T, batch $BATCH"
bf16=""; if [ "$DEVICE" = cuda ]; then bf16="--bf16"; fi
$PY benchmarks/bench_train_step.py --device "$DEVICE" --batch-size "$BATCH" $bf16 --iters "$STEPS" --baseline-iters 3
$PY benchmarks/bench_train_step.py --device "$DEVICE" --batch-size "$BATCH" --iters "$STEPS" --baseline-iters 3

echo "== (3) revq-pipe train, 512T preset, 2 epochs over $N synthetic latents"
$PY - "$work" "$N" <<'PYTHON'
import sys, numpy as np
work, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
np.save(f"{work}/train.npy", rng.standard_normal((n, 32, 8, 8), dtype=np.float32).astype(np.float16))
np.save(f"{work}/val.npy", rng.standard_normal((min(n, 10000), 32, 8, 8), dtype=np.float32).astype(np.float16))
PYTHON
cli cache import "$work/train.npy" --out "$work/train.zarr" --split train
cli cache import "$work/val.npy" --out "$work/val.zarr" --split val
sets=(--set train.device="$DEVICE" --set train.data_on_device=always --set train.log_every=100)
if [ "$DEVICE" = cuda ]; then sets+=(--set train.bf16=true); fi
for setting in $EXTRA_SET; do sets+=(--set "$setting"); done
cli train --config configs/512T.yaml --train-cache "$work/train.zarr" --val-cache "$work/val.zarr" \
  --run "$work/run" --epochs 2 "${sets[@]}"
$PY - "$work/run/metrics.jsonl" <<'PYTHON'
import json, sys
last = [json.loads(line) for line in open(sys.argv[1])][-1]
hours = 100 * 1_281_167 / last["samples_per_s"] / 3600
print(f"epoch {last['epoch']}: {last['samples_per_s']:,.0f} samples/s -> 100 epochs over 1,281,167 latents "
      f"in {hours:.2f} h of training steps (validation and checkpoints not included); target: under 2 h")
PYTHON

echo "== (4) CUDA-only tests"
if [ "$DEVICE" = cuda ]; then $PY -m pytest -q -m gpu tests; else echo "skipped on $DEVICE"; fi

echo "== (5) online vs cached training, 512T, batches $ONLINE_BATCHES (issue 11)"
$PY benchmarks/bench_online_vs_cached.py --device "$DEVICE" --batch-sizes "$ONLINE_BATCHES"
