#!/usr/bin/env bash
# Everything only a GPU can show, as one prepared run (sized for about 7 minutes on an H200: give it timeout_s 540).
#   here:   make setup && bash benchmarks/device_wheels.sh
#   there:  device tool run, carry [".whl"]:  bash benchmarks/device_check.sh
# Writes its whole log to $OUT/device_check.log and the figures that the GPU rows of docs/measurements.md
# and docs/scale.md need to $OUT/device_figures.jsonl (one JSON object per measurement), so that one run
# fills them.
#  (1) the device and the versions
#  (2) the exact search on the GPU: ids equal to the CPU's on the same inputs (512T, and 256T-L's K), the
#      deferred exactness check (no host sync) equal too
#  (3) the 512T training step at batch 256 in each precision policy (fp32, tf32, bf16), ours vs the baseline
#  (4) `revq-pipe train` of the 512T, 256T-B and 256T-L presets, 2 epochs over synthetic latents resident on
#      the GPU: samples/s projected to 100 epochs over ImageNet's 1,281,167 latents, peak memory
#  (5) determinism: two identical short runs with train.deterministic=true, and two without, compared
#  (6) stage one: encode images/s through the DC-AE f32c32 architecture at 256 px with loader workers on
#      this machine's cores, next to the encoder's forward alone
#  (7) the CUDA-only tests
#  (8) issue 11's online vs cached training at batches ONLINE_BATCHES
# A test of this script on a CPU (small sizes; see the variables below):
#   DEVICE=cpu N=4096 BATCH=8 STEPS=1 TINY=1 ONLINE_BATCHES=1 PY=.venv/bin/python bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda} N=${N:-131072} BATCH=${BATCH:-256} STEPS=${STEPS:-20} PY=${PY:-python3} TINY=${TINY:-}
ONLINE_BATCHES=${ONLINE_BATCHES:-64,256} WORKERS=${WORKERS:-$(nproc)}
OUT=${OUT:-$(mktemp -d)}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The checkout is not installed there: expose its folders as revq_pipe.*, as pyproject.toml maps them.
mkdir -p "$work/src/revq_pipe"
for part in pipeline cache stages demo configs; do ln -s "$PWD/$part" "$work/src/revq_pipe/$part"; done
export PYTHONPATH=$work/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 REVQ_FIGURES=$OUT/device_figures.jsonl
exec > >(tee "$OUT/device_check.log") 2>&1
cli() { $PY -m revq_pipe.stages.cli "$@"; }
# TINY: presets shrunk so that a CPU finishes (the structure of every section is what is tested then)
shrink=(); if [ -n "$TINY" ]; then shrink=(--set quantizer.codebook_size=256 --set rectifier.width=64 --set rectifier.depth=1); fi

echo "== (1) device"
if [ "$DEVICE" = cuda ]; then nvidia-smi -L; fi
$PY -c "import torch, diffusers, zarr; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| zarr', zarr.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

echo "== (2) exact search on $DEVICE vs the CPU"
$PY - "$DEVICE" "$TINY" <<'PYTHON'
import json, os, sys, time, torch
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
device, tiny = torch.device(sys.argv[1]), bool(sys.argv[2])
for name, tokens, codes, batch in (("512T", 512, 256 if tiny else 16384, 8 if tiny else 256),
                                   ("256T-L", 256, 256 if tiny else 262144, 4 if tiny else 32)):
    torch.manual_seed(0)
    cpu = MultiGroupQuantizer((32, 8, 8), tokens, codes)
    x = torch.randn(batch, tokens, cpu.token_dim)
    expected = cpu.nearest(x)
    gpu = MultiGroupQuantizer((32, 8, 8), tokens, codes).to(device)
    gpu.load_state_dict(cpu.state_dict())
    ids = gpu.nearest(x.to(device))
    deferred, check = gpu.nearest(x.to(device), deferred=True)
    if device.type == "cuda": torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        gpu.nearest(x.to(device), deferred=True)
    if device.type == "cuda": torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 5 * 1e3
    same = torch.equal(ids.cpu(), expected) and torch.equal(deferred.cpu(), expected) and check.holds()
    print(f"{name}: batch {batch}, K={codes}: ids equal to the CPU's {torch.equal(ids.cpu(), expected)}, deferred "
          f"check equal {torch.equal(deferred.cpu(), expected)} (holds {check.holds()}); deferred search {ms:.1f} ms, "
          f"plan {gpu.search_plan(batch)}")
    open(os.environ["REVQ_FIGURES"], "a").write(json.dumps({"section": "search", "preset": name, "batch": batch,
                                                             "ids_equal_cpu": same, "deferred_ms": ms}) + "\n")
PYTHON

echo "== (3) training step, 512T, batch $BATCH, per precision policy"
for precision in fp32 tf32 bf16; do
  echo "-- precision $precision"
  $PY benchmarks/bench_train_step.py --device "$DEVICE" --batch-size "$BATCH" --precision "$precision" \
    --iters "$STEPS" --baseline-iters 2
done

echo "== (4) revq-pipe train, three presets, 2 epochs over synthetic latents resident on $DEVICE"
$PY - "$work" "$N" <<'PYTHON'
import sys, numpy as np
work, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
np.save(f"{work}/train.npy", rng.standard_normal((n, 32, 8, 8), dtype=np.float32).astype(np.float16))
np.save(f"{work}/val.npy", rng.standard_normal((min(n, 10000), 32, 8, 8), dtype=np.float32).astype(np.float16))
PYTHON
cli cache import "$work/train.npy" --out "$work/train.zarr" --split train
cli cache import "$work/val.npy" --out "$work/val.zarr" --split val
report() {  # $1 = run, $2 = preset
  $PY - "$1/metrics.jsonl" "$2" <<'PYTHON'
import json, os, sys
last = [json.loads(line) for line in open(sys.argv[1])][-1]
hours = 100 * 1_281_167 / last["samples_per_s"] / 3600
print(f"{sys.argv[2]} epoch {last['epoch']}: {last['samples_per_s']:,.0f} samples/s -> 100 epochs over 1,281,167 "
      f"latents in {hours:.2f} h of training steps (validation and checkpoints not included); "
      f"searches repeated {last['searches_repeated']}")
open(os.environ["REVQ_FIGURES"], "a").write(json.dumps({"section": "train", "preset": sys.argv[2],
    "samples_per_s": last["samples_per_s"], "hours_100_epochs": hours, "precision": last["precision"]}) + "\n")
PYTHON
}
sets=(--set train.device="$DEVICE" --set train.data_on_device=always --set train.log_every=100 "${shrink[@]}")
for preset in 512T 256T-B 256T-L; do
  cli train --config "configs/$preset.yaml" --train-cache "$work/train.zarr" --val-cache "$work/val.zarr" \
    --run "$work/run-$preset" --epochs 2 "${sets[@]}" --set train.allow_small_cache=true 2>&1 | grep -v " step [0-9]* loss"
  report "$work/run-$preset" "$preset"
done

echo "== (5) determinism: two identical short runs, with and without train.deterministic"
for deterministic in true false; do
  for attempt in a b; do
    cli train --config configs/512T.yaml --train-cache "$work/train.zarr" --val-cache "$work/val.zarr" \
      --run "$work/det-$deterministic-$attempt" --epochs 1 "${sets[@]}" --set train.deterministic=$deterministic \
      > /dev/null 2>&1
  done
  $PY - "$work/det-$deterministic-a" "$work/det-$deterministic-b" "$deterministic" <<'PYTHON'
import hashlib, json, os, sys
digest = lambda run: hashlib.sha256(open(f"{run}/tokenizer/model.safetensors", "rb").read()).hexdigest()
rate = lambda run: [json.loads(line) for line in open(f"{run}/metrics.jsonl")][-1]["samples_per_s"]
same = digest(sys.argv[1]) == digest(sys.argv[2])
print(f"train.deterministic={sys.argv[3]}: the two tokenizers are the same bytes: {same}; "
      f"{rate(sys.argv[1]):,.0f} / {rate(sys.argv[2]):,.0f} samples/s")
open(os.environ["REVQ_FIGURES"], "a").write(json.dumps({"section": "determinism", "deterministic": sys.argv[3],
    "identical": same, "samples_per_s": [rate(sys.argv[1]), rate(sys.argv[2])]}) + "\n")
PYTHON
done

echo "== (6) stage one: encode at 256 px through the DC-AE f32c32 architecture, $WORKERS loader workers"
$PY - "$work/dcae" <<'PYTHON'
import sys, torch
from diffusers import AutoencoderDC
sys.path.insert(0, "benchmarks")
from bench_online_vs_cached import DC_AE_F32C32_SANA
torch.manual_seed(0)
AutoencoderDC(**DC_AE_F32C32_SANA).save_pretrained(sys.argv[1])  # random weights: none can be downloaded
PYTHON
images=2048; if [ -n "$TINY" ]; then images=8; fi
$PY benchmarks/bench_encode.py --vae "$work/dcae" --device "$DEVICE" --num-images $images --image-size 320 \
  --resolution 256 --batch-size 64 --workers "$WORKERS" --repeats 1 --no-s3

echo "== (7) CUDA-only tests"
if [ "$DEVICE" = cuda ]; then $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_cache_reader.py; else echo "skipped on $DEVICE"; fi

echo "== (8) online vs cached training, 512T, batches $ONLINE_BATCHES (issue 11)"
$PY benchmarks/bench_online_vs_cached.py --device "$DEVICE" --batch-sizes "$ONLINE_BATCHES"
echo "figures in $OUT/device_figures.jsonl"
