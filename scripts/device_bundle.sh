#!/usr/bin/env bash
# The GPU half of `python -m train.bundle`, on a lent GPU machine that has this checkout but not
# ../shared: unpack the training cache, train the five folds and the final model
# (`train.bundle --train-only`), time the warm per-series latency, and leave the runs in $OUT.
#
# Here, first (what travels is capped at 64 MiB, the checkout's ~25 MiB included; a 256 px pack is 18.2 MiB):
#   S=../shared/data; python -m train.prepare $S/rsna-png $S/phe-sich $S/roboflow-ich --input brain \
#       --size 192 --min-brain 0 --out .ich-data/cache-brain-192
#   python -m train.pack .ich-data/cache-brain-192 .ich-data/pack --quality 40     # 13.5 MiB
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pydicom                           # the one package it lacks
# There (carry .ich-data/pack and .whl):
#   bash scripts/device_bundle.sh .ich-data/pack --epochs 40 [other train.bundle options]
# Back here, with the files it returned in OUT (run.tar.part-*, each under 16 MiB):
#   mkdir -p .ich-data/bundle-gpu && cat OUT/run.tar.part-* | tar -x -C .ich-data/bundle-gpu
#   python -m train.bundle --size 192 --epochs 40 --work .ich-data/bundle-gpu   # reuses the runs; calibrates, checks
# Training stops after ICH_TRAIN_SECONDS (default 420) so the rest fits in one 10-minute command; the
# runs finished by then come back, and a later call trains only the others. The six runs train at once
# (ICH_JOBS, default 6), each in its own process: one ResNet18 at batch 32 leaves an H200 mostly idle;
# each run's log is in run/<name>.log (it comes back with the runs). ICH_DEVICE=cpu with
# PYTHON=.venv/bin/python makes a dry run here (e.g. with --max-steps 2; tests/test_train.py does);
# ICH_WORK moves the scratch folder (default /tmp/ich-bundle).
set -euo pipefail
pack=${1:?usage: scripts/device_bundle.sh PACK [train.bundle options]}
shift
out=${OUT:-/tmp/ich-device-out}
work=${ICH_WORK:-/tmp/ich-bundle}
device=${ICH_DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out" "$work"
if ! "$py" -c "import pydicom" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/device.txt"
"$py" -m train.pack --unpack "$pack" "$work/cache"
size=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["size"])' "$pack/cache.json")
timeout "${ICH_TRAIN_SECONDS:-420}" "$py" -m train.bundle --train-only --cache "$work/cache" --size "$size" \
  --device "$device" --jobs "${ICH_JOBS:-6}" --workers 2 --work "$work" "$@" 2>&1 | tee "$out/train.log" || echo "training stopped: $?" | tee -a "$out/train.log"
# Warm per-series latency, model resident: a 36-slice phantom series through `ich predict`, 10 calls.
if [ -f "$work/run/final.json" ]; then
  "$py" -m ich phantom --studies 1 --thickness 4.2 --out "$work/phantom" >/dev/null
  "$py" -m ich predict "$work/phantom" --weights "$work/run/final.json" --device "$device" --out "$work/sub.csv" \
    --timings --repeat 10 --quiet | tee "$out/latency.json"
fi
# What the bundle needs of the runs: records, validation predictions and the final weights (no fold
# weights, no resume states).
(cd "$work" && find run -name '*.json' -o -name '*.valid.parquet' -o -name '*.log' -o -name final.safetensors) |
  tar -C "$work" -cf - -T - | split -b 15M - "$out/run.tar.part-"
ls -la "$out"
