#!/usr/bin/env bash
# Run ON the GPU machine (no internet), from the repo root, with .device carried
# (see prepare_device.sh). Installs the carried wheels, builds FFCV against the carried
# Debian packages (or installs the wheel built by an earlier call), installs fastcifar
# without touching the machine's torch, and converts the real data. Source it:
#   source benchmarks/gpu/device_setup.sh
set -eo pipefail
root=$PWD/.device/sysroot
export PKG_CONFIG_PATH=$root/usr/lib/x86_64-linux-gnu/pkgconfig
export LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .device/wheels/* 2>&1 | tail -2
if ls .device/ffcv-*-linux_x86_64.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/ffcv-*-linux_x86_64.whl
else
  setup_started=$(date +%s)
  python3 -m pip wheel -q --no-index --no-deps --no-build-isolation -w /tmp/ffcv-wheel .device/ffcv-1.0.2.tar.gz
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/ffcv-wheel/ffcv-*.whl
  echo "ffcv built in $(( $(date +%s) - setup_started )) s"
  [ -n "${OUT:-}" ] && cp /tmp/ffcv-wheel/ffcv-*.whl "$OUT/"
fi
python3 -c "import ffcv, torch, numba, numpy; print('ffcv ok; torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
fastcifar() { python3 -m fastcifar "$@"; }  # a function: scripts do not expand aliases
setup_started=$(date +%s)
python3 -m fastcifar convert --source .device/cifar10-jpeg.tar.gz --out /tmp/datasets | tail -1
echo "convert took $(( $(date +%s) - setup_started )) s"
