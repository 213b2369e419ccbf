#!/usr/bin/env bash
# Install unbake into a virtual environment and fetch the default model's weights.
#
#   bash install/install.sh            # runtime only, into ./.venv
#   bash install/install.sh --test     # plus pytest, hypothesis and jsonschema, and (as root, on
#                                      # Debian/Ubuntu) audacity, xvfb, xdotool for the Audacity
#                                      # tests and ardour for the Ardour test; the VST3 built in
#                                      # place for its tests
#   bash install/install.sh --plugin   # plus the VST3, built and copied into ~/.vst3
#   UNBAKE_VENV=/path/to/venv bash install/install.sh
#
# torch is installed first and pinned (torch==2.13.0): installing it through the package's
# dependencies would let pip pick the newest build, with gigabytes of CUDA libraries.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${UNBAKE_VENV:-$root/.venv}
extras=""
plugin=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    --plugin) plugin=1 ;;
    *) echo "unbake: install.sh: unknown option $arg (options: --test, --plugin)" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}

# The Audacity tests run the real Audacity (Debian's package ships mod-script-pipe) under Xvfb.
if [ -n "$extras" ] && ! { command -v audacity && command -v Xvfb && command -v xdotool; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "unbake: installing audacity, xvfb, xdotool (for the Audacity tests)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt_install=(apt-get install -y -q audacity xvfb xdotool)
    "${apt_install[@]}" >&2 || { apt-get update -q >&2 && "${apt_install[@]}" >&2; }
  else
    echo "unbake: audacity, Xvfb or xdotool missing: the Audacity tests will skip (install them as root)" >&2
  fi
fi

# The Ardour test runs the real Ardour 7 headless (Debian's package: ardour7-lua, the dummy audio
# backend, VST3 support; ~210 MB, without the video timeline it recommends, which pulls in ffmpeg).
if [ -n "$extras" ] && ! command -v ardour7-lua >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "unbake: installing ardour (for the Ardour test)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt_install=(apt-get install -y -q --no-install-recommends ardour)
    "${apt_install[@]}" >&2 || { apt-get update -q >&2 && "${apt_install[@]}" >&2; }
  else
    echo "unbake: ardour7-lua missing: the Ardour test will skip (install ardour as root)" >&2
  fi
fi

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

# The VST3 (plugin_bridge/vst3): --plugin builds it and copies unbake.vst3 into ~/.vst3; --test
# builds it in place for tests/plugin_bridge/test_vst3.py (install/build_vst3.sh installs its build
# dependencies with apt when run as root).
if [ -n "$plugin" ]; then
  bash "$root/install/build_vst3.sh" >&2
elif [ -n "$extras" ]; then
  UNBAKE_VST3_NO_INSTALL=1 bash "$root/install/build_vst3.sh" >&2
fi
