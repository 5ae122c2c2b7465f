#!/bin/bash
# Build the benchmark image once (cached): a Debian 12 base made with debootstrap, imported into the
# Docker engine, plus a Dockerfile with the HPC stack and a layer that deletes and rewrites files.
# 4 layers, ~1.4 GB rootfs. Result: Docker image $IMAGE (and the busybox image for the small case).
#
#   BENCH_DIR   work directory (default /var/tmp/hpcbench)
#   DOCKER_HOST the engine to use (default: the test engine's socket)
set -euo pipefail
BENCH_DIR=${BENCH_DIR:-/var/tmp/hpcbench}
export DOCKER_HOST=${DOCKER_HOST:-unix:///var/tmp/hpcconv-test/docker/docker.sock}
IMAGE=${IMAGE:-hpcbench/hpcapp:1}
BASE=hpcbench/debian-base:12
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$BENCH_DIR"
here=$(cd "$(dirname "$0")" && pwd)

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "image $IMAGE already built (cached)"; exit 0
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || apt-get install -y debootstrap
  root="$BENCH_DIR/debootstrap-rootfs"
  rm -rf "$root"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  # one layer; the engine records it as the image's first layer
  tar --numeric-owner --xattrs -C "$root" -c . | docker import \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'CMD ["/bin/bash"]' - "$BASE"
  rm -rf "$root"
fi

ctx="$BENCH_DIR/context"
rm -rf "$ctx"; mkdir -p "$ctx"
cp "$here/Dockerfile.hpcapp" "$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE="$BASE" -t "$IMAGE" "$ctx"
docker image inspect "$IMAGE" --format '{{.Size}} bytes, {{len .RootFS.Layers}} layers'
