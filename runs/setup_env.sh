# Sourced by the runners: make sure a Python environment with nanochat_nb is active.
# Inside an active virtualenv it installs nothing that is already there; otherwise it creates and uses ./.venv.
# torch is pinned to the CPU build available offline; on a GPU node install the CUDA build of the same version first.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x "$_repo/.venv/bin/python" ]; then
    echo "[setup_env] creating $_repo/.venv"
    python3 -m venv "$_repo/.venv"
  fi
  . "$_repo/.venv/bin/activate"
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup_env] installing torch==2.13.0"
  pip install -q torch==2.13.0
fi
if ! python -c "import nanochat_nb, nbdev, pytest" 2>/dev/null; then
  echo "[setup_env] installing nanochat_nb (editable) with its dev tools"
  pip install -q -e "$_repo[dev]"
fi
unset _repo
