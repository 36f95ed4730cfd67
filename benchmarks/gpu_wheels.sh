#!/bin/bash
# Before a GPU benchmark (benchmarks/gpu.sh): the packages jaxlm needs that the lent GPU
# machine's image lacks (it has Python 3.12, jax with CUDA, torch, flax, optax, etils, but not
# tensorflow-datasets and its needs, ml-collections or tensorboardX; orbax-checkpoint is carried
# at the version jaxlm is tested with), as wheels in .whl/ (git-ignored), about 11 MB. Run it
# here, where PyPI is reachable; the GPU machine reaches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl  # only this run's wheels: pip install .whl/*.whl takes every file there
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  tensorflow-datasets==4.9.10 array-record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1 \
  simple-parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0 \
  googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2 ml-collections==1.1.0 \
  tensorboardX==2.6.5 orbax-checkpoint==0.12.8
# promise is published as source only; it is pure Python, so a wheel built here runs there.
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
ls .whl
