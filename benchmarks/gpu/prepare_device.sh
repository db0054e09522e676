#!/usr/bin/env bash
# Run HERE (the CPU machine with apt and PyPI): gather what building FFCV on the GPU machine
# needs into .device/ (git-ignored), which `run` carries there:
#   .device/sysroot  Debian packages FFCV compiles and links against, unpacked with dpkg -x
#   .device/ffcv-1.0.2.tar.gz  the FFCV sdist
#   .device/wheels   Python 3.12 wheels missing on the GPU image
#   .device/cifar10-jpeg.tar.gz  the real data (betons are too large to carry; convert there)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device/debs .device/wheels
rm -rf .device/sysroot && mkdir -p .device/sysroot

# Headers of every OpenCV module (opencv2/opencv.hpp includes them all), the two runtime
# libraries FFCV links (core, imgproc), libturbojpeg and the shared libraries they load.
headers=$(dpkg -S /usr/include/opencv4 | sed "s|: /usr/include/opencv4||; s|:amd64||g; s|,| |g")
runtime="libopencv-core406 libopencv-imgproc406 libturbojpeg0 libturbojpeg0-dev libtbb12 \
  liblapack3 libblas3 libgfortran5 libquadmath0 libglx0 libglvnd0 libx11-6 libxcb1 libxau6 \
  libxdmcp6 libbsd0 libmd0"
(cd .device/debs && apt-get download $headers $runtime >/dev/null)
for deb in .device/debs/*.deb; do dpkg -x "$deb" .device/sysroot; done
# Keep headers, .so files and pkg-config files; drop docs and static archives.
rm -rf .device/sysroot/usr/share .device/sysroot/usr/lib/x86_64-linux-gnu/*.a
# The device-side CUDA headers: nothing opencv2/opencv.hpp reaches includes them, and the
# carried tree must stay under the device's 64 MiB with the tracked weights file.
rm -rf .device/sysroot/usr/include/opencv4/opencv2/core/cuda
find .device/sysroot/usr/lib/x86_64-linux-gnu -name 'libopencv_*' \
  ! -name 'libopencv_core*' ! -name 'libopencv_imgproc*' -delete
# FFCV only calls cv::resize: link core + imgproc rather than every module opencv4.pc names.
cat > .device/sysroot/usr/lib/x86_64-linux-gnu/pkgconfig/opencv4.pc <<'PC'
prefix=${pcfiledir}/../../..
Name: OpenCV
Description: OpenCV core and imgproc (trimmed for FFCV)
Version: 4.6.0
Libs: -L${prefix}/lib/x86_64-linux-gnu -lopencv_imgproc -lopencv_core
Cflags: -I${prefix}/include/opencv4
PC
sed -i 's|^prefix=.*|prefix=${pcfiledir}/../../..|; s|^libdir=.*|libdir=${prefix}/lib/x86_64-linux-gnu|; s|^includedir=.*|includedir=${prefix}/include|' \
  .device/sysroot/usr/lib/x86_64-linux-gnu/pkgconfig/libturbojpeg.pc
rm -rf .device/debs
# dpkg -x runs no maintainer scripts: make the links update-alternatives would have made.
lib=.device/sysroot/usr/lib/x86_64-linux-gnu
ln -sf lapack/liblapack.so.3 $lib/liblapack.so.3
ln -sf blas/libblas.so.3 $lib/libblas.so.3

[ -f .device/ffcv-1.0.2.tar.gz ] || .venv/bin/pip download -q --no-deps --no-binary :all: \
  --no-build-isolation ffcv==1.0.2 -d .device
for package in fastargs terminaltables assertpy pytorch-pfn-extras torch-lr-finder torchinfo; do
  ls .device/wheels | grep -qi "^${package//-/_}" || .venv/bin/pip download -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    --platform any -d .device/wheels "$package" 2>/dev/null || \
    .venv/bin/pip download -q --no-deps -d .device/wheels "$package"
done
cp -f ../shared/datasets/cifar10-jpeg.tar.gz .device/
du -sh .device .device/*
# What travels: the tracked and untracked-not-ignored files (a link as a link) and .device,
# at most 64 MiB in all.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s \
  | awk '{s += $1} END {print s}')
travel=$(( tree + $(find .device -type f -printf '%s\n' | awk '{s += $1} END {print s}') ))
echo "travels $(( travel / 1048576 )) MiB of 64"
[ $travel -le $(( 64 * 1048576 )) ] || { echo "error: the tree and .device exceed 64 MiB" >&2
  exit 1; }
