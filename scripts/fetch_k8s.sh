#!/usr/bin/env bash
# Builds the control plane the tests run a real Kubernetes API server with (dev/stack/kube.py):
#
#   kube-apiserver, kube-controller-manager, kubectl   from k8s.io/kubernetes (scripts/k8s/kube)
#   etcd                                               from go.etcd.io/etcd/server/v3 (scripts/k8s/etcd)
#
# (The CRDs the tests apply to it come from scripts/fetch_schemas.sh, like the schemas.)
#
# There is no Debian package for kube-apiserver and `go install k8s.io/kubernetes/...` is refused
# (its go.mod replaces the staging modules k8s.io/api, k8s.io/client-go, ... with local paths),
# so two small wrapper modules under scripts/k8s/ require the release and point every staging
# module at its published v0.x build; their go.sum files pin every hash. Everything comes from
# the Go module proxy and is checked against the checksum database.
#
# The binaries (~250 MB) go to a cache OUTSIDE the checkout, keyed by the pins, so a fresh clone
# on the same machine does not rebuild them (a cold build takes ~10-15 min on 2 cores):
#
#   ${NEC_TOOLS_CACHE:-$HOME/.cache/nec-serve}/k8s-<version>-<hash>/{bin/*,PINS}
#
# Idempotent: when PINS matches it prints the directory and exits. The build happens in a
# temporary directory and is moved into place when complete, one build at a time (flock).
# Prints the cache directory on stdout.
#
# Usage: scripts/fetch_k8s.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- pins (the module versions themselves live in scripts/k8s/*/go.mod) -----------------
KUBERNETES_VERSION=v1.34.5
ETCD_VERSION=v3.6.4
# ----------------------------------------------------------------------------------------

say() { echo "fetch_k8s: $*" >&2; }
die() { say "error: $*"; exit 1; }

grep -qF "k8s.io/kubernetes $KUBERNETES_VERSION" scripts/k8s/kube/go.mod \
    || die "scripts/k8s/kube/go.mod does not require k8s.io/kubernetes $KUBERNETES_VERSION; keep the two in step"
grep -qF "go.etcd.io/etcd/server/v3 $ETCD_VERSION" scripts/k8s/etcd/go.mod \
    || die "scripts/k8s/etcd/go.mod does not require etcd $ETCD_VERSION; keep the two in step"
command -v go >/dev/null 2>&1 || die "the Go toolchain (>= 1.24) is needed to build kube-apiserver and etcd"

hash=$(cat scripts/k8s/kube/go.mod scripts/k8s/kube/go.sum scripts/k8s/etcd/go.mod scripts/k8s/etcd/go.sum \
    scripts/k8s/etcd/main.go | sha256sum | cut -c1-12)
PIN="kubernetes=$KUBERNETES_VERSION etcd=$ETCD_VERSION modules=$hash"
ROOT=${NEC_TOOLS_CACHE:-$HOME/.cache/nec-serve}
DEST=$ROOT/k8s-$KUBERNETES_VERSION-$hash
BINARIES=(kube-apiserver kube-controller-manager kubectl etcd)

up_to_date() {
    [ -f "$DEST/PINS" ] && [ "$(cat "$DEST/PINS")" = "$PIN" ] || return 1
    local b
    for b in "${BINARIES[@]}"; do [ -x "$DEST/bin/$b" ] || return 1; done
}

if [ "${1:-}" != "--force" ] && up_to_date; then
    echo "$DEST"
    exit 0
fi

mkdir -p "$ROOT"
exec 9>"$ROOT/.k8s.lock"
flock 9
if [ "${1:-}" != "--force" ] && up_to_date; then   # another session built it while we waited
    echo "$DEST"
    exit 0
fi

TMP=$(mktemp -d "$ROOT/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/bin"
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

major=${KUBERNETES_VERSION#v}; major=${major%%.*}
minor=${KUBERNETES_VERSION#v*.}; minor=${minor%%.*}
ver=k8s.io/component-base/version
cver=k8s.io/client-go/pkg/version
ldflags="-s -w"
for v in $ver $cver; do
    ldflags+=" -X $v.gitVersion=$KUBERNETES_VERSION -X $v.gitMajor=$major -X $v.gitMinor=$minor"
    ldflags+=" -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
done
say "building kube-apiserver, kube-controller-manager, kubectl $KUBERNETES_VERSION (~10-15 min cold)"
(cd scripts/k8s/kube && go build -trimpath -ldflags "$ldflags" -o "$TMP/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl)
say "building etcd $ETCD_VERSION"
(cd scripts/k8s/etcd && go build -trimpath -ldflags "-s -w" -o "$TMP/bin/etcd" .)

"$TMP/bin/kube-apiserver" --version >&2
"$TMP/bin/etcd" --version >&2
echo "$PIN" > "$TMP/PINS"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
say "ready in $DEST"
echo "$DEST"
