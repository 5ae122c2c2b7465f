#!/usr/bin/env bash
# Install everything hpcconv and its test suite need on Debian 12, as root. Idempotent.
#   - system packages: Docker engine, registry, Charliecloud, squashfs tools, qemu-user, Go + the Sylabs SIF source, peers
#   - the arm64 dpkg architecture (to fetch busybox-static:arm64 for test images)
#   - binfmt_misc with qemu-aarch64 enabled (foreign-arch images run under ch-run)
#   - hpcconv itself with its Python dependencies (pip install -e .[test])
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

pkgs=(docker.io docker-registry charliecloud squashfs-tools squashfs-tools-ng squashfuse fuse3
      qemu-user-static binfmt-support golang-go golang-github-sylabs-sif-dev golang-github-spf13-cobra-dev
      golang-github-spf13-pflag-dev golang-github-google-uuid-dev busybox-static
      skopeo umoci apache2-utils openssl ca-certificates
      gcc libc6-dev libopenmpi-dev openmpi-bin libmpich-dev mpich libfabric1 libibverbs1 ibverbs-providers
      rdma-core libpsm2-2 libucx0
      debootstrap)  # third line: the Debian 12 base image of the recipe build tests (tests/debianbase.py)  # second line: real MPI/fabric files for the rewrite-pass tests
# the C speed-ups (hpcconv/_native.c, built by pip below) need the headers of the Python that runs hpcconv
if [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
  pkgs+=(python3-dev)
fi
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  need_update=1
fi
if [ ${#missing[@]} -gt 0 ] || [ -n "${need_update:-}" ]; then
  apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# busybox-static debs for the test images (amd64 + arm64), cached outside the repository
debs=${HPCCONV_TEST_WORK:-/var/tmp/hpcconv-test}/debs
mkdir -p "$debs"
for a in amd64 arm64; do
  ls "$debs"/busybox-static_*_"$a".deb >/dev/null 2>&1 || (cd "$debs" && apt-get download -qq "busybox-static:$a")
done

# qemu-user for aarch64 through binfmt_misc (ch-run then runs arm64 images transparently)
if [ -d /proc/sys/fs/binfmt_misc ] && [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
fi
if [ -e /proc/sys/fs/binfmt_misc/register ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
fi

# the Sylabs reference siftool (SIF oracle of the tests), built offline from the Debian Go source
bash "$here/scripts/build-siftool.sh" >/dev/null

# hpcconv and its Python dependencies
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e "$here[test]"
# byte code for the package (an editable install ships none, and where PYTHONDONTWRITEBYTECODE is set
# every start would compile the modules again: ~0.1 s of each run)
python3 -m compileall -q "$here/hpcconv" >/dev/null
