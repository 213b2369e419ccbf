#!/usr/bin/env bash
# Install unbake into a virtual environment and fetch the default model's weights.
#
#   bash install/install.sh            # runtime only, into ./.venv
#   bash install/install.sh --test     # plus pytest, hypothesis and jsonschema
#   UNBAKE_VENV=/path/to/venv bash install/install.sh
#
# torch is installed first and pinned (torch==2.13.0): installing it through the package's
# dependencies would let pip pick the newest build, with gigabytes of CUDA libraries.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${UNBAKE_VENV:-$root/.venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "unbake: creating virtual environment $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "unbake: installing torch 2.13.0" >&2
  "${pip[@]}" install "torch==${UNBAKE_TORCH_VERSION:-2.13.0}"
fi
echo "unbake: installing unbake$extras" >&2
"${pip[@]}" install -e "$root$extras"
"$venv/bin/unbake" fetch spleeter-2stems >&2
