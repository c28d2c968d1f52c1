#!/usr/bin/env bash
# Set up DIR (default .aarch64) to run cross-compiled aarch64 artifacts under qemu-user on an x86-64 Debian/Ubuntu
# machine (used by `make aarch64-env`; read by arq_deploy.runtime.qemu):
#   1. Debian packages: qemu-user-static (runs aarch64 programs), gcc/g++-aarch64-linux-gnu (links the libraries);
#   2. DIR/root: Debian's arm64 Python and the libraries it needs, unpacked from .debs fetched with a private apt
#      state for arm64 (the host's dpkg and its package lists are not touched; no multiarch install);
#   3. DIR/site: the aarch64 wheels of apache-tvm, apache-tvm-ffi (the versions installed in HOST_PYTHON) and numpy;
#   4. a smoke test under qemu, then DIR/.ready-v1. Idempotent: a ready DIR returns at once.
# Usage: .ci/aarch64-env.sh [DIR] [HOST_PYTHON]
set -euo pipefail
DIR=${1:-.aarch64}
HOSTPY=${2:-python3}
READY="$DIR/.ready-v1"
have() { command -v "$1" >/dev/null 2>&1; }

if [ -f "$READY" ] && have qemu-aarch64-static && have aarch64-linux-gnu-gcc; then
    echo "aarch64-env: ready in $DIR"
    exit 0
fi
case "$(uname -m)" in
    x86_64 | amd64) ;;
    *) echo "aarch64-env: skipped: this is an $(uname -m) machine; the qemu setup is for x86-64 hosts" \
            "(the ARM tests skip)"
       exit 0 ;;
esac
start=$(date +%s)

# 1. Debian packages
need=()
for p in qemu-user-static gcc-aarch64-linux-gnu g++-aarch64-linux-gnu; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "aarch64-env: apt-get install ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. the arm64 Python root
mkdir -p "$DIR"
abs=$(cd "$DIR" && pwd)
rm -rf "$abs/apt" "$abs/debs" "$abs/root" "$abs/site" "$READY"
mkdir -p "$abs/apt/state/lists/partial" "$abs/apt/cache/archives/partial" "$abs/debs" "$abs/root"
: > "$abs/apt/status"
apt_opts=(-o APT::Architecture=arm64 -o APT::Architectures=arm64 -o Dir::State="$abs/apt/state"
          -o Dir::State::status="$abs/apt/status" -o Dir::Cache="$abs/apt/cache" -o Debug::NoLocking=1)
echo "aarch64-env: arm64 Python from Debian's .debs"
apt-get "${apt_opts[@]}" update -qq
pkgs=$(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
           --no-replaces --no-enhances python3-minimal libpython3-stdlib libstdc++6 \
       | grep -v '^[ <]' | sort -u | grep -Ev '^(perl.*|libperl.*|dpkg|tar|install-info|debconf.*)$')
# shellcheck disable=SC2086  # one word per package
(cd "$abs/debs" && apt-get "${apt_opts[@]}" -qq download $pkgs 2>&1 | grep -v "unsandboxed" || true)
for f in "$abs"/debs/*.deb; do dpkg-deb -x "$f" "$abs/root"; done
rm -rf "$abs/apt"
py=$(find "$abs/root/usr/bin" -maxdepth 1 -name 'python3.[0-9]*' -printf '%f\n' | grep -E '^python3\.[0-9]+$' | sort -V | tail -1)
[ -n "$py" ] || { echo "aarch64-env: no python3.X in the arm64 packages" >&2; exit 1; }

# 3. aarch64 wheels, the same TVM versions as the host's
tvm=$("$HOSTPY" -c "import importlib.metadata as m; print(m.version('apache-tvm'))")
ffi=$("$HOSTPY" -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
echo "aarch64-env: aarch64 wheels apache-tvm==$tvm apache-tvm-ffi==$ffi numpy for ${py#python}"
"$HOSTPY" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$abs/site" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --python-version "${py#python}" --implementation cp --only-binary=:all: \
    "apache-tvm==$tvm" "apache-tvm-ffi==$ffi" numpy 2>&1 | grep -v "^WARNING: Location" || true
[ -d "$abs/site/tvm" ] || { echo "aarch64-env: the aarch64 apache-tvm wheel did not install" >&2; exit 1; }
rm -f "$abs"/site/tvm/lib/libtvm_compiler.so  # 240 MB of compiler: the runner needs TVM's runtime only

# 4. smoke test: TVM's runtime imports under emulation
env -i PATH="$PATH" PYTHONPATH="$abs/site" TVM_USE_RUNTIME_LIB=1 \
    qemu-aarch64-static -L "$abs/root" "$abs/root/usr/bin/$py" -s -B -c \
    "import platform, numpy, tvm; from tvm.runtime.vm import VirtualMachine; assert platform.machine() == 'aarch64'; print('aarch64-env: under qemu:', platform.machine(), 'python', platform.python_version(), 'tvm', tvm.__version__, 'numpy', numpy.__version__)"
touch "$READY"
echo "aarch64-env: ready in $DIR ($(( $(date +%s) - start )) s)"
