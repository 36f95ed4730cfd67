#!/bin/bash
# The train-step benchmark on a lent GPU, in one call of the device tool:
#   bash benchmarks/gpu_wheels.sh        # here first: the wheels the GPU image lacks, in .whl/
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
# For PTB small, medium and the RHN, RE and REAL, in float32 and then in bfloat16
# (model.compute_dtype), `benchmarks/train_step.py --peer` against the cuDNN peer
# (benchmarks/peer_torch_device.py, the same dtype), the peak from 8192^3 matmuls of XLA and
# torch on the GPU. One run per model and dtype, each stopped at 90 s, so that a slow one
# loses only its own table. Writes $OUT/machine.txt (the GPU, jax and torch) and
# $OUT/train_step_MODEL_DTYPE.txt (the log, ending in the table). Extra arguments go to each
# train_step.py run (e.g. --steps=3 --repeats=1 --matmul_size=256 for a smoke test); MODELS
# (default "small medium rhn") picks the models.
# PYTHON (default python3) runs jaxlm; PEER_PYTHON (default: PYTHON) runs torch;
# JAXLM_PEER_DEVICE (default cuda) is where the peer and torch's matmuls run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
PEER_PYTHON=${PEER_PYTHON:-$PYTHON}
# The carried wheels, only where the image lacks what they provide.
if [ -d .whl ] && ! "$PYTHON" -c 'import tensorflow_datasets, ml_collections, tensorboardX' \
    2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jaxlm-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/jaxlm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax and the torch peer share the GPU's memory
export JAXLM_PEER_DEVICE=${JAXLM_PEER_DEVICE:-cuda}
{
  nvidia-smi -L 2>&1 || true
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  "$PEER_PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda:", torch.cuda.is_available())'
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
status=0
for dtype in float32 bfloat16; do
  for model in ${MODELS:-small medium rhn}; do
    JAXLM_PEER_DTYPE=$dtype timeout 90 "$PYTHON" benchmarks/train_step.py \
      --only=$model --noeval --round_seconds=1.5 --matmul_size=8192 \
      --peer --peer_python="$PEER_PYTHON" --peer_script=benchmarks/peer_torch_device.py \
      --config.model.compute_dtype=$dtype "$@" 2>&1 | tee "$OUT/train_step_${model}_$dtype.txt" \
      || status=1
  done
done
exit $status
