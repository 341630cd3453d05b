#!/usr/bin/env bash
# Every GPU check in one call: the gpu-marked tests, the kernel bench, the loader bench with
# DALI-GPU, the e2e race at 224 px (ResNet34 -> ResNet18, with the ImageNet projection) and the
# step table. Results go to $OUT (set by the device runner) or runs/bench/gpu.
set -uo pipefail
out=${OUT:-runs/bench/gpu}
mkdir -p "$out"
py=${PYTHON:-python}
log() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  log "gpu tests"
  "$py" -m pytest tests -q -m gpu -p no:cacheprovider -x
  log "fastkd bench kernels"
  "$py" -m fastkd bench kernels --repeats 20 --out "$out/kernels"
  log "fastkd bench loader (DALI-GPU)"
  "$py" -m fastkd bench loader --images 2000 --epochs 3 --batch-size 256 --out "$out/loader"
  log "fastkd bench e2e resnet34 -> resnet18, 224 px"
  "$py" -m fastkd bench e2e --device cuda --img-size 224 --batch-size 256 --steps 20 \
      --repeats 3 --images 4000 --project imagenet --out "$out/e2e"
  log "fastkd bench step"
  "$py" -m fastkd bench step --device cuda --out "$out/step"
} 2>&1 | tee "$out/gpu_check.log"
