#!/usr/bin/env bash
# sonoscore on an NVIDIA Jetson: JetPack 6.1/6.2 (L4T R36.4: CUDA 12.6, TensorRT 10.3, Python 3.10) and
# JetPack 7.x (L4T R38 = 7.0/7.1, Thor, CUDA 13.0; L4T R39 = 7.2.x, Orin and Thor, CUDA 13.2; Python 3.12).
# JetPack 6.0 (L4T R36.2/R36.3) ships TensorRT 8.6, which the trt backend refuses: there this sets up the ort
# backend only (onnxruntime-gpu and pycuda, no TensorRT bindings).
#
#   device/setup.sh                 install into /opt/sonoscore/venv (asks sudo for apt and /opt)
#   device/setup.sh --service       ... and install the systemd unit, udev rule, service user and env file
#   device/setup.sh --dry-run       print what it would do, change nothing
#   device/setup.sh --no-apt        leave system packages alone (an image that manages them): only report missing ones
#
# What it does, each step skipped when already done (safe to run again, e.g. after `git pull`):
#   1. detect the L4T release (/etc/nv_tegra_release, else the nvidia-l4t-core package) -> JetPack 6 or 7
#   2. apt: python3-venv, python3-dev, python3-pip, build-essential, and TensorRT's Python bindings
#      (python3-libnvinfer, not on JetPack 6.0) from JetPack's own apt repository: never TensorRT from PyPI here
#   3. a venv made with --system-site-packages, so it sees those system TensorRT bindings
#   4. sonoscore from this checkout (--no-deps) and its dependencies except onnxruntime
#   5. onnxruntime-gpu built for Jetson, from the Jetson AI Lab index (ORT_INDEX_URL); CPU onnxruntime from PyPI
#      when that index has no wheel for this JetPack and Python (it says so; --backend ort then runs on the CPU)
#   6. pycuda, compiled against the system CUDA (CUDA_ROOT, default /usr/local/cuda): pycuda>=2024.1 on CUDA 12,
#      pycuda>=2025.1.2 on CUDA 13 (older ones do not build there: cuCtxCreate_v4, inducer/pycuda#485, fixed in #487)
#   7. `sonoscore doctor` to show what is usable
#   8. with --service: user 'sonoscore' (groups video, render), /etc/sonoscore/sonoscore.env (never overwritten),
#      udev rule tagging V4L2 devices for systemd, /etc/systemd/system/sonoscore.service, enabled (not started)
#
# Settings (environment variables; defaults follow the detected JetPack):
#   PREFIX=/opt/sonoscore  VENV=$PREFIX/venv  CUDA_ROOT=/usr/local/cuda  SERVICE_USER=sonoscore
#   ORT_INDEX_URL   pip index with onnxruntime-gpu for this JetPack. Defaults (NVIDIA Jetson AI Lab):
#                   JetPack 6.1/6.2 (R36.4, CUDA 12.6): https://pypi.jetson-ai-lab.io/jp6/cu126
#                   JetPack 6.0 (R36.2/36.3, CUDA 12.2): https://pypi.jetson-ai-lab.io/jp6/cu122
#                   JetPack 7.x (R38 CUDA 13.0, R39 CUDA 13.2): https://pypi.jetson-ai-lab.io/sbsa/cu130 (for
#                   R39 the index NVIDIA staff named for JetPack 7.2; if it has no wheel, CPU onnxruntime is used)
#                   Older wheels: https://elinux.org/Jetson_Zoo#ONNX_Runtime. Set ORT_INDEX_URL=none to keep CPU
#                   onnxruntime from PyPI (the trt backend does not need onnxruntime-gpu).
#   ORT_VERSION     pin onnxruntime-gpu (e.g. 1.23.0); empty = newest on the index
#   NUMPY_SPEC      numpy constraint; JetPack 6 default 'numpy<2' (its TensorRT 10.3 bindings and Jetson wheels of
#                   that era are built against NumPy 1.x); JetPack 7 default: none
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

DRY_RUN=0
SERVICE=0
NO_APT=0
L4T_OVERRIDE=""
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/sonoscore}"
CUDA_ROOT="${CUDA_ROOT:-/usr/local/cuda}"
SERVICE_USER="${SERVICE_USER:-sonoscore}"
PYPI_SIMPLE="https://pypi.org/simple"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --service) SERVICE=1 ;;
    --no-apt) NO_APT=1 ;;
    --l4t) L4T_OVERRIDE="${2:?--l4t needs a version such as 36.4.3}"; shift ;;
    --prefix) PREFIX="${2:?--prefix needs a folder}"; shift ;;
    --venv) VENV="${2:?--venv needs a folder}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
VENV="${VENV:-$PREFIX/venv}"
PY="$VENV/bin/python"

info() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: warning: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# run CMD...: execute, or print it (shell-quoted) under --dry-run. Probes that change nothing run in both modes.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
as_root() { if [[ $EUID -eq 0 ]]; then run "$@"; else run sudo "$@"; fi; }
have() { command -v "$1" >/dev/null 2>&1; }
venv_ready() { [[ -x "$PY" ]]; }
py_ok() { venv_ready && "$PY" -c "$1" >/dev/null 2>&1; }

# -- 1. which JetPack ----------------------------------------------------------------------------------------------
detect_l4t() {
  if [[ -n "$L4T_OVERRIDE" ]]; then echo "$L4T_OVERRIDE"; return; fi
  if [[ -r /etc/nv_tegra_release ]]; then
    sed -nE 's/^# R([0-9]+) \(release\), REVISION: ([0-9.]+).*/\1.\2/p' /etc/nv_tegra_release | head -n1
    return
  fi
  if have dpkg-query; then
    dpkg-query -W -f='${Version}' nvidia-l4t-core 2>/dev/null | cut -d- -f1 || true
  fi
}

L4T="$(detect_l4t)"
[[ -n "$L4T" ]] || die "this is not a Jetson (no /etc/nv_tegra_release and no nvidia-l4t-core package). On an x86 \
GPU host install TensorRT's wheel from NVIDIA's index and pycuda by hand (device/README.md); to preview the steps \
elsewhere pass --dry-run --l4t 36.4.3"
L4T_MAJOR="${L4T%%.*}"
L4T_MINOR="$(echo "$L4T" | cut -d. -f2)"
WITH_TRT=1
case "$L4T_MAJOR" in
  36)
    JETPACK=6
    if [[ "${L4T_MINOR:-0}" -ge 4 ]]; then default_index="https://pypi.jetson-ai-lab.io/jp6/cu126"
    else default_index="https://pypi.jetson-ai-lab.io/jp6/cu122"; WITH_TRT=0; fi
    default_numpy="numpy<2"
    pycuda_spec="pycuda>=2024.1"
    ;;
  38|39)  # R38: JetPack 7.0/7.1 (Thor, CUDA 13.0); R39: JetPack 7.2.x (Orin and Thor, CUDA 13.2)
    JETPACK=7
    default_index="https://pypi.jetson-ai-lab.io/sbsa/cu130"
    default_numpy=""
    pycuda_spec="pycuda>=2025.1.2"  # first release that builds against CUDA 13 (inducer/pycuda#487)
    ;;
  *) die "L4T R$L4T is not supported: sonoscore's Jetson setup covers JetPack 6 (L4T R36) and JetPack 7 (L4T R38, \
R39); flash a supported JetPack, or use the CPU install (pip install .)" ;;
esac
ORT_INDEX_URL="${ORT_INDEX_URL:-$default_index}"
ORT_VERSION="${ORT_VERSION:-}"
NUMPY_SPEC="${NUMPY_SPEC-$default_numpy}"
info "L4T R$L4T -> JetPack $JETPACK; venv $VENV; onnxruntime-gpu index: $ORT_INDEX_URL"
if [[ $WITH_TRT -eq 0 ]]; then
  info "JetPack 6.0 ships TensorRT 8.6 and the trt backend needs JetPack 6.1+ (TensorRT 10.3): setting up the ort \
backend only"
fi
if [[ $DRY_RUN -eq 1 ]]; then info "dry run: commands that would change the system are printed, not run"; fi

# -- 2. system packages --------------------------------------------------------------------------------------------
apt_wanted=(python3-venv python3-dev python3-pip build-essential)
if [[ $WITH_TRT -eq 1 ]]; then apt_wanted+=(python3-libnvinfer); fi
apt_missing=()
for pkg in "${apt_wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || apt_missing+=("$pkg")
done
if [[ ${#apt_missing[@]} -gt 0 && $NO_APT -eq 1 ]]; then
  warn "system packages missing (not installed: --no-apt): ${apt_missing[*]}"
elif [[ ${#apt_missing[@]} -gt 0 ]]; then
  note=""
  if [[ " ${apt_missing[*]} " == *" python3-libnvinfer "* ]]; then
    note=" (python3-libnvinfer is TensorRT's Python binding, from JetPack)"
  fi
  info "installing system packages: ${apt_missing[*]}$note"
  as_root apt-get update
  as_root apt-get install -y --no-install-recommends "${apt_missing[@]}"
else
  info "system packages present (${apt_wanted[*]})"
fi
if [[ ! -x "$CUDA_ROOT/bin/nvcc" ]]; then
  if [[ $DRY_RUN -eq 1 ]]; then warn "no CUDA toolkit at $CUDA_ROOT (nvcc); a real run stops here"
  else die "no CUDA toolkit at $CUDA_ROOT (nvcc is needed to build pycuda): install it with 'sudo apt install \
nvidia-jetpack' (or cuda-toolkit), or set CUDA_ROOT"; fi
fi

# -- 3. the venv ---------------------------------------------------------------------------------------------------
if venv_ready; then
  grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" || die "$VENV exists but was made without \
--system-site-packages, so it cannot see JetPack's TensorRT; remove it (rm -rf $VENV) and run this again"
  info "venv present: $VENV"
else
  if [[ ! -w "$(dirname "$VENV")" && ! -d "$VENV" ]]; then
    as_root mkdir -p "$VENV"
    as_root chown "$(id -u):$(id -g)" "$VENV"
  fi
  info "making the venv (with --system-site-packages, to see JetPack's TensorRT bindings)"
  run /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if venv_ready && [[ $WITH_TRT -eq 1 ]]; then
  if trt_version="$("$PY" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null)"; then
    info "TensorRT $trt_version is visible in the venv"
  else
    warn "TensorRT's Python bindings do not import in the venv; the trt backend will be unavailable (check \
python3-libnvinfer matches $("$PY" -c 'import sys; print(sys.version.split()[0])'))"
  fi
fi
PIP=("$PY" -m pip install --disable-pip-version-check)
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
if [[ -n "$NUMPY_SPEC" ]]; then printf '%s\n' "$NUMPY_SPEC" > "$constraints"; fi
run "${PIP[@]}" --upgrade pip wheel setuptools

# -- 4. sonoscore and its dependencies, except onnxruntime ---------------------------------------------------------
# pip would pull CPU onnxruntime for sonoscore's 'onnxruntime' requirement, and it would overwrite onnxruntime-gpu's
# files (both install the module 'onnxruntime'): so sonoscore goes in with --no-deps and its requirements follow,
# read from the installed metadata, minus onnxruntime.
info "installing sonoscore from $REPO"
run "${PIP[@]}" -c "$constraints" --no-deps --upgrade "$REPO"
if [[ $DRY_RUN -eq 1 ]] && ! py_ok 'import importlib.metadata as m; m.version("sonoscore")'; then
  printf '+ %s\n' "$PY -m pip install -c <constraints: ${NUMPY_SPEC:-none}> <sonoscore's requirements except \
onnxruntime>"
else
  mapfile -t reqs < <("$PY" -c '
import importlib.metadata as md, re
for r in md.requires("sonoscore") or []:
    if "extra ==" not in r and not re.match(r"onnxruntime\b", r):
        print(r.split(";")[0].strip())')
  run "${PIP[@]}" -c "$constraints" "${reqs[@]}"
fi

# -- 5. onnxruntime-gpu --------------------------------------------------------------------------------------------
ORT_HAS_CUDA='import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'
if py_ok "$ORT_HAS_CUDA"; then
  info "onnxruntime with the CUDA execution provider is already installed"
elif [[ "$ORT_INDEX_URL" == "none" ]]; then
  info "ORT_INDEX_URL=none: CPU onnxruntime from PyPI"
  run "${PIP[@]}" -c "$constraints" "onnxruntime>=1.17"
else
  info "installing onnxruntime-gpu for JetPack $JETPACK from $ORT_INDEX_URL"
  if py_ok 'import importlib.metadata as m; m.version("onnxruntime")'; then
    run "$PY" -m pip uninstall -y onnxruntime  # the CPU wheel: it would shadow onnxruntime-gpu's module
  fi
  if ! run "${PIP[@]}" -c "$constraints" --index-url "$ORT_INDEX_URL" --extra-index-url "$PYPI_SIMPLE" \
      "onnxruntime-gpu${ORT_VERSION:+==$ORT_VERSION}"; then
    warn "pip found no onnxruntime-gpu${ORT_VERSION:+ $ORT_VERSION} wheel for this JetPack and Python at \
$ORT_INDEX_URL (or could not reach it), so CPU onnxruntime from PyPI goes in instead: --backend ort works, on the \
CPU; set ORT_INDEX_URL to an index with a wheel for this JetPack and run again for the GPU"
    run "${PIP[@]}" -c "$constraints" "onnxruntime>=1.17"
  elif [[ $DRY_RUN -eq 0 ]] && ! py_ok "$ORT_HAS_CUDA"; then
    warn "the onnxruntime installed from $ORT_INDEX_URL has no CUDA execution provider: --backend ort runs on the \
CPU. Set ORT_INDEX_URL to the index for this JetPack (see the header of this script) and run again"
  fi
fi

# -- 6. pycuda against the system CUDA -----------------------------------------------------------------------------
if py_ok 'import pycuda.driver'; then
  info "pycuda present: $("$PY" -c 'import pycuda; print(pycuda.VERSION_TEXT)')"
else
  for header in cuda.h curand.h; do  # pycuda compiles against both; a runtime-only CUDA lacks them
    if [[ ! -f "$CUDA_ROOT/include/$header" ]]; then
      msg="$CUDA_ROOT/include/$header is missing: pycuda needs the CUDA toolkit's development files; install them \
with 'sudo apt install nvidia-jetpack' (or cuda-toolkit-<version>, which has libcurand-dev), or set CUDA_ROOT"
      if [[ $DRY_RUN -eq 1 ]]; then warn "$msg"; else die "$msg"; fi
    fi
  done
  info "building pycuda against $CUDA_ROOT (a few minutes)"
  run env CUDA_ROOT="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH" CPATH="$CUDA_ROOT/include" \
    LIBRARY_PATH="$CUDA_ROOT/lib64:$CUDA_ROOT/lib64/stubs" \
    "${PIP[@]}" -c "$constraints" --no-build-isolation "$pycuda_spec"
fi

# -- 7. what works ---------------------------------------------------------------------------------------------------
run "$VENV/bin/sonoscore" doctor || warn "sonoscore doctor failed; see above"

# -- 8. the service --------------------------------------------------------------------------------------------------
if [[ $SERVICE -eq 1 ]]; then
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    info "creating system user $SERVICE_USER"
    as_root useradd --system --home-dir /var/lib/sonoscore --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  for grp in video render; do  # GPU (nvhost/nvgpu) and V4L2 device nodes are group video on L4T
    if getent group "$grp" >/dev/null && ! id -nG "$SERVICE_USER" 2>/dev/null | grep -qw "$grp"; then
      as_root usermod -aG "$grp" "$SERVICE_USER"
    fi
  done
  as_root install -d -m 755 /etc/sonoscore
  if [[ -e /etc/sonoscore/sonoscore.env ]]; then
    info "/etc/sonoscore/sonoscore.env exists; left as it is"
  else
    as_root install -m 644 "$REPO/device/sonoscore.env" /etc/sonoscore/sonoscore.env
  fi
  as_root install -m 644 "$REPO/device/99-sonoscore-video.rules" /etc/udev/rules.d/99-sonoscore-video.rules
  unit="$(mktemp)"
  sed -e "s#/opt/sonoscore/venv#$VENV#g" -e "s#/opt/sonoscore/src#$REPO#g" -e "s#/usr/local/cuda/bin#$CUDA_ROOT/bin#g" \
    "$REPO/device/sonoscore.service" > "$unit"
  as_root install -m 644 "$unit" /etc/systemd/system/sonoscore.service
  rm -f "$unit"
  as_root udevadm control --reload
  as_root udevadm trigger --subsystem-match=video4linux
  as_root systemctl daemon-reload
  as_root systemctl enable sonoscore.service
  info "service installed and enabled: set BUNDLE and SOURCE in /etc/sonoscore/sonoscore.env, run device/selftest \
once, then: sudo systemctl start sonoscore; journalctl -u sonoscore -f"
fi
info "done. Check the device with: $PY $REPO/device/selftest --bundle <bundle>"
