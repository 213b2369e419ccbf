#!/usr/bin/env bash
# Build unbake_rt_host (plugin_bridge/vst3/testhost): a console VST3 host that plays audio through a
# plugin at the audio rate and times every processBlock call (tests/plugin_bridge/test_vst3_realtime.py).
#   install/build_vst3_testhost.sh   configure and build Release (-j2); the same build dependencies as
#                                    install/build_vst3.sh (run that first: it installs them)
#   UNBAKE_TESTHOST_BUILD=DIR        build folder (default: plugin_bridge/vst3/testhost/build)
#   UNBAKE_VST3_JOBS=N               parallel jobs (default 2)
# Prints the path of the built binary on its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/plugin_bridge/vst3/testhost"
build="${UNBAKE_TESTHOST_BUILD:-$src/build}"
jobs="${UNBAKE_VST3_JOBS:-2}"

pkgs=(cmake g++ pkg-config juce-modules-source libx11-dev libxext-dev libxinerama-dev libxrandr-dev
      libxcursor-dev libfreetype-dev)
missing=()
if command -v dpkg-query >/dev/null; then
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
fi
if ((${#missing[@]})); then
    echo "missing build dependencies: ${missing[*]}" >&2
    echo "install them: sudo apt-get install --no-install-recommends ${missing[*]} (or run install/build_vst3.sh as root)" >&2
    exit 1
fi

mkdir -p "$build"
launcher=()  # ccache, when installed, makes rebuilds in a fresh build folder quick
command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" >&2
cmake --build "$build" --config Release -j "$jobs" >&2

built="$build/unbake_rt_host_artefacts/Release/unbake_rt_host"
[[ -x "$built" ]] || built="$build/unbake_rt_host_artefacts/unbake_rt_host"
[[ -x "$built" ]] || { echo "build finished but the unbake_rt_host binary is missing under $build" >&2; exit 1; }
echo "$built"
