#!/usr/bin/env bash
# Prepare a fresh Debian machine for fastcifar: FFCV's system libraries, a .venv, the package.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v pkg-config >/dev/null || missing+=(pkg-config)
dpkg -s libturbojpeg0-dev >/dev/null 2>&1 || missing+=(libturbojpeg0-dev)
dpkg -s libopencv-dev >/dev/null 2>&1 || missing+=(libopencv-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi

stamp=.venv/.fastcifar-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing fastcifar and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned to the release these machines carry on disk (no multi-GB download).
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  # FFCV compiles against the system libraries above and needs numpy/torch at build time.
  .venv/bin/python -m pip install -q numpy setuptools wheel Cython
  .venv/bin/python -m pip install -q --no-build-isolation "ffcv==1.0.2"
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
