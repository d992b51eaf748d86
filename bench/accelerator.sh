#!/usr/bin/env bash
# Everything to measure on a machine with a GPU or TPU, into one Markdown file
# (bench/accelerator.py's stderr goes to OUT.log).
#
#   bash bench/accelerator.sh [OUT.md]          # default: accelerator.md
#
# 1. the test suite (its tests run on fake CPU devices, as everywhere);
# 2. bench/accelerator.py: the whole pretraining step on 1 and on all local devices
#    (pmap, scaling efficiency), the host input rate against what the step consumes,
#    and the official PyTorch step on the same machine when torch sees CUDA.
# Environment (for a quick dry run on CPU, e.g. ACCEL_TESTS=0 ACCEL_CASES=conv4:2:cifar10
# ACCEL_REPEATS=1 ACCEL_BATCH=8 ACCEL_ALLOW_CPU=1):
#   ACCEL_TESTS=0 skips the tests; ACCEL_CASES, ACCEL_REPEATS, ACCEL_BATCH, ACCEL_WORKERS
#   are passed to bench/accelerator.py; ACCEL_ALLOW_CPU=1 runs without an accelerator.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-accelerator.md}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_experimental_ynn_fusion_type="  # launch.py's CPU flag; no effect on GPU/TPU

backend="$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null)"
if [[ "$backend" == "cpu" && "${ACCEL_ALLOW_CPU:-0}" != "1" ]]; then
  echo "JAX sees no GPU or TPU (backend: cpu); set ACCEL_ALLOW_CPU=1 for a dry run." >&2
  exit 1
fi

{
  echo "# rr_jax on $(python -c 'import jax; print(jax.local_device_count(), "x", jax.devices()[0].device_kind)' 2>/dev/null)"
  echo
  echo "\`bash bench/accelerator.sh\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%MZ)."
  echo
  if [[ "${ACCEL_TESTS:-1}" == "1" ]]; then
    summary="$(timeout 3600 python -m pytest -q -p no:cacheprovider 2>&1 | tail -n 1 || true)"
    echo "Test suite: ${summary}"
    echo
  fi
  official=()
  [[ "${ACCEL_OFFICIAL:-1}" == "1" ]] || official=(--no-official)
  python bench/accelerator.py \
    --cases "${ACCEL_CASES:-conv4:32:cifar10,resnet32:32:cifar10,resnet34:25:stl10}" \
    --repeats "${ACCEL_REPEATS:-10}" --batch "${ACCEL_BATCH:-64}" --workers "${ACCEL_WORKERS:-8}" \
    "${official[@]}" 2> "${out%.md}.log"
} > "$out"
cat "$out"
