#!/usr/bin/env bash
# Run here, before a device check: download into .whl/ the packages that the device machines' image
# (Python 3.12 with torch, numpy, pillow, pyyaml, rich, typer, huggingface-hub, safetensors) lacks,
# at the versions this checkout's .venv tested. The device tool carries .whl (git-ignored) with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run 'make setup' first: the versions are read from .venv" >&2; exit 2; }
pins=$(.venv/bin/python -m pip freeze 2>/dev/null | grep -i -E \
  '^(diffusers|zarr|numcodecs|donfig|google.crc32c|webdataset|braceexpand|importlib.metadata|lazy.importer|scikit.image)==')
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086  # one argument per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls .whl && du -sh .whl
