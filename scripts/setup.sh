#!/usr/bin/env bash
# Prepare a fresh Debian machine for fastcifar: FFCV's system libraries, a .venv, the package.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# The interpreter the .venv is made from: 3.11 where there is one, else python3 (>= 3.11).
python=$(command -v python3.11 || command -v python3 || true)
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: fastcifar needs Python 3.11 or newer (found: ${python:-none})" >&2
  exit 1
fi
version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

missing=()
command -v pkg-config >/dev/null || missing+=(pkg-config)
dpkg -s libturbojpeg0-dev >/dev/null 2>&1 || missing+=(libturbojpeg0-dev)
dpkg -s libopencv-dev >/dev/null 2>&1 || missing+=(libopencv-dev)
# FFCV builds a C++ extension against Python's headers; the .venv needs ensurepip.
command -v g++ >/dev/null || missing+=(g++)
"$python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=("python$version-dev")
"$python" -c 'import ensurepip' 2>/dev/null || missing+=("python$version-venv")
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A .venv without pip (made while ensurepip was missing) is made again.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "setup: creating .venv"
  rm -rf .venv
  "$python" -m venv .venv
fi

stamp=.venv/.fastcifar-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing fastcifar and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned to one release (a fresh Linux machine downloads its CUDA build, a few
  # GB, from PyPI: the only index CI reaches).
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  # FFCV compiles against the system libraries above and needs numpy/torch at build time.
  .venv/bin/python -m pip install -q numpy setuptools wheel Cython
  .venv/bin/python -m pip install -q --no-build-isolation "ffcv==1.0.2"
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
