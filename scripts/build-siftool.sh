#!/usr/bin/env bash
# Build the Sylabs reference `siftool` (the SIF oracle of the test suite) from Debian's packaged Go
# source, offline: Debian's Go in GOPATH mode, GO111MODULE=off, no proxy, no network.
#   scripts/build-siftool.sh [DEST]      (default: ${HPCCONV_TEST_WORK:-/var/tmp/hpcconv-test}/siftool/siftool)
# Needs golang-go and golang-github-sylabs-sif-dev (which brings cobra, pflag and google/uuid).
# The Debian package ships the library and pkg/siftool but no main package, so a four-line main
# (the one upstream's cmd/siftool has) is written into a private GOPATH next to DEST.
set -euo pipefail
dest=${1:-${HPCCONV_TEST_WORK:-/var/tmp/hpcconv-test}/siftool/siftool}
src=/usr/share/gocode/src/github.com/sylabs/sif/pkg/siftool
[ -d "$src" ] || { echo "build-siftool: $src missing (apt-get install golang-github-sylabs-sif-dev)" >&2; exit 1; }
command -v go >/dev/null || { echo "build-siftool: go missing (apt-get install golang-go)" >&2; exit 1; }
top=$(dirname "$dest")/gopath
main=$top/src/hpcconv-siftool
mkdir -p "$main" "$top/cache"
# a go.mod beside main.go makes GOPATH mode resolve the /v2 import path ("minimal module compatibility")
printf 'module hpcconv-siftool\n\ngo 1.18\n' >"$main/go.mod"
cat >"$main/main.go" <<'GO'
package main

import (
	"os"

	"github.com/spf13/cobra"
	"github.com/sylabs/sif/v2/pkg/siftool"
)

func main() {
	root := &cobra.Command{Use: "siftool", Short: "siftool (Sylabs SIF reference tool, Debian source)"}
	if err := siftool.AddCommands(root); err != nil {
		os.Exit(2)
	}
	if err := root.Execute(); err != nil {
		os.Exit(1)
	}
}
GO
tmp=$dest.tmp.$$
GOPATH="$top:/usr/share/gocode" GO111MODULE=off GOPROXY=off GOFLAGS= GOCACHE="$top/cache" CGO_ENABLED=0 \
  go build -o "$tmp" hpcconv-siftool
mv -f "$tmp" "$dest"
echo "$dest"
