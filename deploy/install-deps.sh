#!/usr/bin/env bash
# Installs the Debian 12 packages Pollen builds and runs with. Run as root.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev
  # tcmalloc for the pollen binary: a step allocates many small protobuf
  # messages and tensors, and glibc's malloc took about 12% of a node.
  libgoogle-perftools-dev
  # Debian's libtorch calls a generic BLAS; OpenBLAS makes matrix products
  # about 17x faster.
  libopenblas0-pthread
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libspdlog-dev libopendht-dev nlohmann-json3-dev
  libgtest-dev libbenchmark-dev
)

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
