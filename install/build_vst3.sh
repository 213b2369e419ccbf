#!/usr/bin/env bash
# Build the unbake VST3 (plugin_bridge/vst3) and copy unbake.vst3 into ~/.vst3.
#   install/build_vst3.sh            deps (apt, when root and missing), configure, build Release (-j2), install
#   UNBAKE_VST3_BUILD=DIR            build folder (default: plugin_bridge/vst3/build)
#   UNBAKE_VST3_JOBS=N               parallel jobs (default 2)
#   UNBAKE_VST3_NO_INSTALL=1         build only, do not copy into ~/.vst3
# Prints the path of the installed (or built) unbake.vst3 on its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/plugin_bridge/vst3"
build="${UNBAKE_VST3_BUILD:-$src/build}"
jobs="${UNBAKE_VST3_JOBS:-2}"

# Debian/Ubuntu build dependencies. libmsgpack-cxx-dev is unpacked, not installed: installed, it
# pulls ~147 MB of Boost that MSGPACK_NO_BOOST=1 does not need.
pkgs=(cmake g++ pkg-config juce-modules-source libzmq3-dev cppzmq-dev libx11-dev libxext-dev libxinerama-dev
      libxrandr-dev libxcursor-dev libfreetype-dev libpng-dev libjpeg-dev zlib1g-dev)
missing=()
if command -v dpkg-query >/dev/null; then
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
fi
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]]; then
        echo "installing: ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
    else
        echo "missing build dependencies: ${missing[*]}" >&2
        echo "install them: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
fi

mkdir -p "$build"
msgpack_dir=""
if [[ -f /usr/include/msgpack.hpp ]]; then
    msgpack_dir=/usr/include
else
    msgpack_dir="$build/_deps/msgpack/usr/include"
    if [[ ! -f "$msgpack_dir/msgpack.hpp" ]]; then
        echo "unpacking msgpack-cxx headers (libmsgpack-cxx-dev, without Boost) into $build/_deps" >&2
        mkdir -p "$build/_deps"
        dl="$(mktemp -d)"; chmod 755 "$dl"   # apt's _apt user downloads into it
        (cd "$dl" && apt-get download libmsgpack-cxx-dev >&2) && dpkg-deb -x "$dl"/libmsgpack-cxx-dev_*.deb "$build/_deps/msgpack"
        rm -rf "$dl"
    fi
fi

launcher=()  # ccache, when installed, makes rebuilds in a fresh build folder quick
command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DUNBAKE_MSGPACK_INCLUDE_DIR="$msgpack_dir" "${launcher[@]}" >&2
cmake --build "$build" --config Release -j "$jobs" >&2

built="$build/unbake_artefacts/Release/VST3/unbake.vst3"
[[ -d "$built" ]] || { echo "build finished but $built is missing" >&2; exit 1; }
if [[ -n "${UNBAKE_VST3_NO_INSTALL:-}" ]]; then
    echo "$built"
    exit 0
fi
mkdir -p "$HOME/.vst3"
rm -rf "$HOME/.vst3/unbake.vst3"
cp -r "$built" "$HOME/.vst3/"
echo "$HOME/.vst3/unbake.vst3"
