#!/usr/bin/env bash
# Fetches the pinned tools and schemas the k8s tests render the manifests with and apply to the
# real API server (tests/support/k8s.py), into a gitignored cache inside the checkout:
#
#   .cache/bin/kustomize                          built from sigs.k8s.io/kustomize/kustomize/v5
#   .cache/schemas/kserve-<v>/*.yaml              github.com/kserve/kserve CRDs + Triton runtime
#   .cache/schemas/eventing-kafka-broker-<v>/     knative.dev/eventing-kafka-broker KafkaSource CRD
#   .cache/schemas/knative-serving-<v>/           knative.dev/serving Service CRD
#   .cache/schemas/keda-<v>/                      github.com/kedacore/keda/v2 ScaledObject CRD
#   .cache/schemas/prometheus-operator-<v>/       PodMonitor CRD (prometheus-operator)
#   .cache/schemas/manifest.json                  what is where (read by tests/support/k8s.py)
#
# Everything comes from the Go module proxy (GOPROXY, default https://proxy.golang.org) through
# the `go` command, so every module is checked against the checksum database and against the
# go.sum hashes pinned below. Idempotent: when manifest.json matches the pins and the files
# are there it exits at once; otherwise it rebuilds the cache. The Go module and build caches
# it needs on the way (about 1 GB) are temporary and removed at the end; what stays is ~30 MB.
#
# Usage: scripts/fetch_schemas.sh [--force]       (NEC_CACHE_DIR overrides .cache)
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- pins ------------------------------------------------------------------------------
# kustomize: the engine behind `kubectl apply -k`. v5.8.1 builds with go >= 1.24 (v5.8.2 needs
# go 1.26, v5.8.3 go 1.27).
KUSTOMIZE_MODULE=sigs.k8s.io/kustomize/kustomize/v5
KUSTOMIZE_VERSION=v5.8.1
KUSTOMIZE_SUM=h1:Pgsg5psubpVEy7Nf6S89PARg5VmmWUC1l9dC6Dl4PG0=
# KServe: the release whose CRDs the manifests are written for; its Python SDK (kserve==0.20.0)
# is the one nec_serve.deploy builds objects with. v0.20.0 is the newest tag the proxy serves.
KSERVE_MODULE=github.com/kserve/kserve
KSERVE_VERSION=v0.20.0
KSERVE_SUM=h1:Bs7HxmGV4KFqqptDcWseKv+mwD4YOYHJWcuVgPG2Gug=
# The core Kubernetes schemas are the API server's own (scripts/fetch_k8s.sh builds it): the
# tests validate against it, so no swagger.json is fetched here.
# Knative, one release (1.22) for both modules: KafkaSource (what the controller creates) from
# eventing-kafka-broker, Service (the wrappers, and what KServe's Serverless mode creates) from
# serving. KServe v0.20.0 builds against knative.dev/serving v0.48.1 (Knative 1.21), but the
# module proxy has no v0.48.x of eventing-kafka-broker, so both are the next release's newest
# patch it has, v0.49.x (their go.mod files require the same knative.dev/pkg). Module tag
# v0.N.x is Knative release 1.(N-27): v0.49 is Knative 1.22.
KNATIVE_KAFKA_MODULE=knative.dev/eventing-kafka-broker
KNATIVE_KAFKA_VERSION=v0.49.2
KNATIVE_KAFKA_SUM=h1:85T7j4dQbhBErsL1NHMqioxlPWlO7xpEw3h5vUcoidI=
KNATIVE_SERVING_MODULE=knative.dev/serving
KNATIVE_SERVING_VERSION=v0.49.1
KNATIVE_SERVING_SUM=h1:he1NlNTnrLyamM4a2XL5mNeiTL8jTAuEqqf7y7WOoI8=
# KEDA: the ScaledObject of the Kafka-lag overlay (k8s/components/kafka-lag-scaling). v2.18.3
# builds against k8s.io/api v0.34, as the rest.
KEDA_MODULE=github.com/kedacore/keda/v2
KEDA_VERSION=v2.18.3
KEDA_SUM=h1:PY3o80tzBAzCffS8J6eBZctT4B+g/r26zErNSMleC50=
# prometheus-operator: the PodMonitor of k8s/monitoring (podMetricsEndpoints[].portNumber,
# which the Knative wrappers need, is in v0.85).
PROMOP_MODULE=github.com/prometheus-operator/prometheus-operator
PROMOP_VERSION=v0.85.0
PROMOP_SUM=h1:M5xLCLEoaW2IJfnuCwFzzpL+jSVQu3KGT84Pye+fW8s=
# Files taken from the KServe module (relative to its root).
KSERVE_FILES=(
    config/crd/full/serving.kserve.io_inferenceservices.yaml
    config/crd/full/serving.kserve.io_servingruntimes.yaml
    config/crd/full/serving.kserve.io_clusterservingruntimes.yaml
    config/runtimes/kserve-tritonserver.yaml
)
# ... and from the Knative modules.
KNATIVE_KAFKA_FILES=(
    control-plane/config/eventing-kafka-broker/100-source/100-kafka-source.yaml
)
KNATIVE_SERVING_FILES=(
    config/core/300-resources/service.yaml
)
KEDA_FILES=(
    config/crd/bases/keda.sh_scaledobjects.yaml
    config/crd/bases/keda.sh_triggerauthentications.yaml
)
PROMOP_FILES=(
    example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml
)
# ----------------------------------------------------------------------------------------

CACHE=${NEC_CACHE_DIR:-$PWD/.cache}
BIN=$CACHE/bin
SCHEMAS=$CACHE/schemas
MANIFEST=$SCHEMAS/manifest.json
PIN="kustomize=$KUSTOMIZE_VERSION kserve=$KSERVE_VERSION"
PIN+=" knative_kafka=$KNATIVE_KAFKA_VERSION knative_serving=$KNATIVE_SERVING_VERSION"
PIN+=" keda=$KEDA_VERSION prometheus_operator=$PROMOP_VERSION"
KNATIVE_KAFKA_DIR=eventing-kafka-broker-$KNATIVE_KAFKA_VERSION
KNATIVE_SERVING_DIR=knative-serving-$KNATIVE_SERVING_VERSION
KEDA_DIR=keda-$KEDA_VERSION
PROMOP_DIR=prometheus-operator-$PROMOP_VERSION

say() { echo "fetch_schemas: $*" >&2; }
die() { say "error: $*"; exit 1; }

# have DIR FILE... : every FILE's basename is in $SCHEMAS/DIR
have() {
    local dir=$1 f
    shift
    for f in "$@"; do
        [ -f "$SCHEMAS/$dir/$(basename "$f")" ] || return 1
    done
}

up_to_date() {
    [ -f "$MANIFEST" ] && [ -x "$BIN/kustomize" ] || return 1
    grep -qF "\"pins\": \"$PIN\"" "$MANIFEST" || return 1
    have "kserve-$KSERVE_VERSION" "${KSERVE_FILES[@]}" || return 1
    have "$KNATIVE_KAFKA_DIR" "${KNATIVE_KAFKA_FILES[@]}" || return 1
    have "$KNATIVE_SERVING_DIR" "${KNATIVE_SERVING_FILES[@]}" || return 1
    have "$KEDA_DIR" "${KEDA_FILES[@]}" || return 1
    have "$PROMOP_DIR" "${PROMOP_FILES[@]}"
}

if [ "${1:-}" != "--force" ] && up_to_date; then
    exit 0
fi

command -v go >/dev/null 2>&1 || die "the Go toolchain (go >= 1.24) is needed to fetch the pinned \
kustomize and schema modules from the Go module proxy; install it (e.g. apt-get install golang) \
and run scripts/fetch_schemas.sh again"

mkdir -p "$CACHE"
# One fetch at a time (two test sessions may start together); the second waits, then finds
# the cache complete.
exec 9>"$CACHE/.fetch.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [ "${1:-}" != "--force" ] && up_to_date; then
        exit 0
    fi
fi

start=$(date +%s)
WORK=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export GOMODCACHE=$WORK/gomod GOCACHE=$WORK/gobuild GOPATH=$WORK/gopath
export GOFLAGS=-modcacherw GO111MODULE=on CGO_ENABLED=0
unset GOBIN

# download MODULE VERSION EXPECTED_SUM -> prints the module directory
download() {
    local json dir sum
    json=$(cd "$WORK" && go mod download -json "$1@$2") || die "go mod download $1@$2 failed"
    dir=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    sum=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Sum": "\(.*\)",$/\1/p')
    [ -n "$dir" ] && [ -d "$dir" ] || die "go mod download $1@$2 gave no module directory"
    [ "$sum" = "$3" ] || die "$1@$2 has hash $sum, expected the pinned $3"
    printf '%s\n' "$dir"
}

say "downloading $KSERVE_MODULE@$KSERVE_VERSION"
kserve_dir=$(download "$KSERVE_MODULE" "$KSERVE_VERSION" "$KSERVE_SUM")
say "downloading $KNATIVE_KAFKA_MODULE@$KNATIVE_KAFKA_VERSION and $KNATIVE_SERVING_MODULE@$KNATIVE_SERVING_VERSION"
kafka_dir=$(download "$KNATIVE_KAFKA_MODULE" "$KNATIVE_KAFKA_VERSION" "$KNATIVE_KAFKA_SUM")
serving_dir=$(download "$KNATIVE_SERVING_MODULE" "$KNATIVE_SERVING_VERSION" "$KNATIVE_SERVING_SUM")
say "downloading $KEDA_MODULE@$KEDA_VERSION and $PROMOP_MODULE@$PROMOP_VERSION"
keda_dir=$(download "$KEDA_MODULE" "$KEDA_VERSION" "$KEDA_SUM")
promop_dir=$(download "$PROMOP_MODULE" "$PROMOP_VERSION" "$PROMOP_SUM")

stage=$WORK/out
mkdir -p "$stage/bin" "$stage/schemas/kserve-$KSERVE_VERSION" "$stage/schemas/$KNATIVE_KAFKA_DIR" \
    "$stage/schemas/$KNATIVE_SERVING_DIR" "$stage/schemas/$KEDA_DIR" "$stage/schemas/$PROMOP_DIR"
# take MODULE_DIR MODULE@VERSION DEST FILE... : copy the files of a downloaded module into DEST
take() {
    local src=$1 label=$2 dest=$3 f
    shift 3
    for f in "$@"; do
        [ -f "$src/$f" ] || die "$label has no $f"
        cp "$src/$f" "$dest/"
    done
}
take "$kserve_dir" "$KSERVE_MODULE@$KSERVE_VERSION" "$stage/schemas/kserve-$KSERVE_VERSION" \
    "${KSERVE_FILES[@]}"
take "$kafka_dir" "$KNATIVE_KAFKA_MODULE@$KNATIVE_KAFKA_VERSION" "$stage/schemas/$KNATIVE_KAFKA_DIR" \
    "${KNATIVE_KAFKA_FILES[@]}"
take "$serving_dir" "$KNATIVE_SERVING_MODULE@$KNATIVE_SERVING_VERSION" \
    "$stage/schemas/$KNATIVE_SERVING_DIR" "${KNATIVE_SERVING_FILES[@]}"
take "$keda_dir" "$KEDA_MODULE@$KEDA_VERSION" "$stage/schemas/$KEDA_DIR" "${KEDA_FILES[@]}"
take "$promop_dir" "$PROMOP_MODULE@$PROMOP_VERSION" "$stage/schemas/$PROMOP_DIR" "${PROMOP_FILES[@]}"
chmod -R u+w "$stage"

if [ "${1:-}" != "--force" ] && [ -x "$BIN/kustomize" ] \
    && [ "$("$BIN/kustomize" version 2>/dev/null || true)" = "$KUSTOMIZE_VERSION" ]; then
    # Only the schema pins changed: keep the kustomize this script built before.
    say "keeping the cached kustomize $KUSTOMIZE_VERSION"
    cp "$BIN/kustomize" "$stage/bin/kustomize"
else
    download "$KUSTOMIZE_MODULE" "$KUSTOMIZE_VERSION" "$KUSTOMIZE_SUM" >/dev/null
    say "building $KUSTOMIZE_MODULE@$KUSTOMIZE_VERSION (1-3 minutes on 2 cores)"
    (cd "$WORK" && GOBIN=$stage/bin go install -trimpath "$KUSTOMIZE_MODULE@$KUSTOMIZE_VERSION") \
        || die "go install $KUSTOMIZE_MODULE@$KUSTOMIZE_VERSION failed"
fi
got=$("$stage/bin/kustomize" version 2>/dev/null || true)
[ "$got" = "$KUSTOMIZE_VERSION" ] || die "built kustomize reports version '$got', expected $KUSTOMIZE_VERSION"

# json_names PATH... -> ["base1", "base2"]
json_names() {
    local sep="" f
    printf '['
    for f in "$@"; do
        printf '%s"%s"' "$sep" "$(basename "$f")"
        sep=", "
    done
    printf ']'
}

cat >"$stage/schemas/manifest.json" <<EOF
{
  "pins": "$PIN",
  "kustomize": {"module": "$KUSTOMIZE_MODULE", "version": "$KUSTOMIZE_VERSION", "path": "bin/kustomize"},
  "kserve": {"module": "$KSERVE_MODULE", "version": "$KSERVE_VERSION", "sum": "$KSERVE_SUM",
             "dir": "schemas/kserve-$KSERVE_VERSION",
             "crds": ["serving.kserve.io_inferenceservices.yaml",
                      "serving.kserve.io_servingruntimes.yaml",
                      "serving.kserve.io_clusterservingruntimes.yaml"],
             "triton_runtime": "kserve-tritonserver.yaml"},
  "knative_kafka": {"module": "$KNATIVE_KAFKA_MODULE", "version": "$KNATIVE_KAFKA_VERSION",
                    "sum": "$KNATIVE_KAFKA_SUM", "dir": "schemas/$KNATIVE_KAFKA_DIR",
                    "crds": $(json_names "${KNATIVE_KAFKA_FILES[@]}")},
  "knative_serving": {"module": "$KNATIVE_SERVING_MODULE", "version": "$KNATIVE_SERVING_VERSION",
                      "sum": "$KNATIVE_SERVING_SUM", "dir": "schemas/$KNATIVE_SERVING_DIR",
                      "crds": $(json_names "${KNATIVE_SERVING_FILES[@]}")},
  "keda": {"module": "$KEDA_MODULE", "version": "$KEDA_VERSION", "sum": "$KEDA_SUM",
           "dir": "schemas/$KEDA_DIR", "crds": $(json_names "${KEDA_FILES[@]}")},
  "prometheus_operator": {"module": "$PROMOP_MODULE", "version": "$PROMOP_VERSION",
                          "sum": "$PROMOP_SUM", "dir": "schemas/$PROMOP_DIR",
                          "crds": $(json_names "${PROMOP_FILES[@]}")}
}
EOF

# Swap the finished pieces into place (the manifest last, so a half-done cache never looks done).
rm -f "$MANIFEST"
mkdir -p "$BIN" "$SCHEMAS"
mv -f "$stage/bin/kustomize" "$BIN/kustomize"
for d in "$stage/schemas"/*/; do
    name=$(basename "$d")
    rm -rf "${SCHEMAS:?}/$name"
    mv "$d" "$SCHEMAS/$name"
done
mv "$stage/schemas/manifest.json" "$MANIFEST"
rm -rf "$WORK"
trap - EXIT
say "done in $(($(date +%s) - start)) s: $(du -sh "$BIN" "$SCHEMAS" | cut -f1 | paste -sd+) in $CACHE"
