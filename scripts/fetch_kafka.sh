#!/usr/bin/env bash
# Fetches the runtime jars of a pinned Apache Kafka release from Maven Central into a gitignored
# cache inside the checkout, for the local single-node KRaft broker (dev/stack/kafka.py):
#
#   .cache/kafka/libs/*.jar        kafka_2.13 (kafka.Kafka, kafka.tools.StorageTool) and its
#                                  runtime dependencies, log4j2 + its SLF4J binding
#   .cache/kafka/libs/PINS         what was fetched (pom hash + versions); marks the cache done
#
# The jars come from `mvn dependency:copy-dependencies` on scripts/kafka/pom.xml (which holds
# the pins) with strict checksums (-C: every file is checked against Maven Central's checksum).
# Maven's own local repository for the run is temporary and removed at the end, so what stays
# is only the jars (~40 MB). Idempotent: when PINS matches the pom and the broker jar is there
# it exits at once; otherwise it rebuilds the cache and swaps it into place when complete.
#
# Usage: scripts/fetch_kafka.sh [--force]     (NEC_CACHE_DIR overrides .cache; MVN overrides mvn)
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- pins (the versions themselves live in scripts/kafka/pom.xml) ------------------------
KAFKA_VERSION=4.3.1
POM=scripts/kafka/pom.xml
# ----------------------------------------------------------------------------------------

CACHE=${NEC_CACHE_DIR:-$PWD/.cache}
KAFKA=$CACHE/kafka
LIBS=$KAFKA/libs
MVN=${MVN:-mvn}

say() { echo "fetch_kafka: $*" >&2; }
die() { say "error: $*"; exit 1; }

grep -qF "<kafka.version>$KAFKA_VERSION</kafka.version>" "$POM" \
    || die "$POM does not pin kafka.version $KAFKA_VERSION; keep the two in step"
PIN="kafka=$KAFKA_VERSION pom-sha256=$(sha256sum "$POM" | cut -d' ' -f1)"

up_to_date() {
    [ -f "$LIBS/PINS" ] && [ -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] || return 1
    [ "$(head -n1 "$LIBS/PINS")" = "$PIN" ]
}

if [ "${1:-}" != "--force" ] && up_to_date; then
    exit 0
fi

command -v "$MVN" >/dev/null 2>&1 || die "Apache Maven (mvn >= 3.6) is needed to fetch the Kafka \
jars from Maven Central; install it (e.g. apt-get install maven) and run scripts/fetch_kafka.sh again"
command -v java >/dev/null 2>&1 || die "a Java runtime (>= 17) is needed to run Kafka $KAFKA_VERSION"

mkdir -p "$KAFKA"
# One fetch at a time (two test sessions may start together); the second waits, then finds
# the cache complete.
exec 9>"$KAFKA/.fetch.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [ "${1:-}" != "--force" ] && up_to_date; then
        exit 0
    fi
fi

start=$(date +%s)
WORK=$(mktemp -d "$KAFKA/.fetch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

say "downloading Kafka $KAFKA_VERSION runtime jars from Maven Central (a minute or two)"
"$MVN" -B -q -C --no-transfer-progress -f "$POM" \
    -Dmaven.repo.local="$WORK/m2" \
    dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$WORK/libs" \
    >"$WORK/mvn.log" 2>&1 || {
    tail -n 40 "$WORK/mvn.log" >&2
    die "mvn dependency:copy-dependencies failed (log above)"
}

# Check that what the broker and the storage tool need is really there.
jar=$WORK/libs/kafka_2.13-$KAFKA_VERSION.jar
[ -f "$jar" ] || die "no kafka_2.13-$KAFKA_VERSION.jar among the copied dependencies"
classes=$(unzip -Z1 "$jar")
for cls in kafka/Kafka.class kafka/tools/StorageTool.class; do
    grep -qxF "$cls" <<<"$classes" || die "$jar has no $cls"
done
for prefix in kafka-clients- log4j-core- log4j-slf4j-impl- scala-library-; do
    compgen -G "$WORK/libs/$prefix*.jar" >/dev/null || die "no $prefix*.jar among the copied jars"
done

{
    echo "$PIN"
    (cd "$WORK/libs" && ls -1 ./*.jar | sed 's|^\./||')
} >"$WORK/libs/PINS.tmp"

# Swap the finished directory into place (PINS last, so a half-done cache never looks done).
rm -rf "$LIBS"
mv "$WORK/libs" "$LIBS"
mv "$LIBS/PINS.tmp" "$LIBS/PINS"
say "done in $(($(date +%s) - start)) s: $(ls -1 "$LIBS"/*.jar | wc -l) jars, \
$(du -sh "$LIBS" | cut -f1) in $LIBS"
