#!/usr/bin/env bash
# Fetches Triton's perf_analyzer (pinned wheel from PyPI) into a gitignored cache and writes a
# launcher that runs it on this machine:
#
#   .cache/perf_analyzer/perf_analyzer     the launcher (what nec_dev.perf runs)
#   .cache/perf_analyzer/bin/perf_analyzer the binary from the wheel
#   .cache/perf_analyzer/glibc/            Debian 13's libc6, libstdc++6, libgcc-s1, unpacked
#                                          (only where the system glibc is older than 2.38)
#   .cache/perf_analyzer/PINS              what was fetched; marks the cache done
#
# Why this dance: `pip install perf-analyzer` resolves to a 0.1.0 placeholder here, because
# the real wheels (2.58-2.60) are tagged manylinux_2_38 and Debian 12 has glibc 2.36. The
# binary needs GLIBC_2.38 and GLIBCXX_3.4.32. So the wheel is downloaded for its platform tag
# and checked against its pinned SHA-256; where the system glibc is too old, Debian 13's C and
# C++ runtimes are taken with `apt-get download` (private lists and cache, nothing installed,
# the index checked by apt against Debian's archive keys) and the launcher starts the binary
# through that loader, with the private libraries first and the system's after (libssl, libz).
# On a machine with glibc >= 2.38 the launcher runs the binary directly.
#
# Idempotent: exits at once when PINS matches. Usage: scripts/fetch_perf_analyzer.sh [--force]
# (NEC_CACHE_DIR overrides .cache; PYTHON overrides the interpreter that runs pip).
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- pins ------------------------------------------------------------------------------
PA_VERSION=2.60.0
PA_WHEEL=perf_analyzer-$PA_VERSION-py3-none-manylinux_2_38_x86_64.whl
PA_SHA256=23ef56b107ae9233e5cf09fbdf508dd9b936a52f1bae2f63f53c8117087b3f25
DEBIAN_SUITE=trixie           # Debian 13: glibc 2.41, libstdc++ from GCC 14
DEBIAN_MIRROR=http://deb.debian.org/debian
# ----------------------------------------------------------------------------------------

CACHE=${NEC_CACHE_DIR:-$PWD/.cache}
DEST=$CACHE/perf_analyzer
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PIN="perf_analyzer=$PA_VERSION sha256=$PA_SHA256"

say() { echo "fetch_perf_analyzer: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(uname -m)" = x86_64 ] || die "perf_analyzer wheels exist for x86_64 only (this is $(uname -m))"

up_to_date() {
    [ -f "$DEST/PINS" ] && [ -x "$DEST/perf_analyzer" ] && [ "$(head -n1 "$DEST/PINS")" = "$PIN" ]
}
if [ "${1:-}" != "--force" ] && up_to_date; then
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.perf_analyzer.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    if [ "${1:-}" != "--force" ] && up_to_date; then
        exit 0
    fi
fi

start=$(date +%s)
WORK=$(mktemp -d "$CACHE/.perf_analyzer.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/out/bin"

say "downloading perf_analyzer $PA_VERSION from PyPI"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_38_x86_64 --python-version 3.11 \
    "perf-analyzer==$PA_VERSION" -d "$WORK/wheel" >"$WORK/pip.log" 2>&1 || {
    cat "$WORK/pip.log" >&2
    die "pip download of perf-analyzer==$PA_VERSION failed (log above)"
}
wheel=$WORK/wheel/$PA_WHEEL
[ -f "$wheel" ] || die "pip fetched $(ls "$WORK/wheel"), not $PA_WHEEL"
got=$(sha256sum "$wheel" | cut -d' ' -f1)
[ "$got" = "$PA_SHA256" ] || die "$PA_WHEEL has SHA-256 $got, expected $PA_SHA256"
unzip -q -o "$wheel" 'perf_analyzer/bin/perf_analyzer' -d "$WORK/wheel"
mv "$WORK/wheel/perf_analyzer/bin/perf_analyzer" "$WORK/out/bin/perf_analyzer"
chmod +x "$WORK/out/bin/perf_analyzer"

glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
newest=$(printf '%s\n2.38\n' "$glibc" | sort -V | tail -n1)
extra="system glibc $glibc"
if [ "$newest" != "$glibc" ]; then
    command -v apt-get >/dev/null 2>&1 || die "glibc $glibc is older than 2.38 and there is no \
apt-get to fetch a newer C runtime; run perf_analyzer on a machine with glibc >= 2.38"
    say "glibc $glibc < 2.38: fetching Debian $DEBIAN_SUITE's libc6, libstdc++6, libgcc-s1"
    apt=$WORK/apt
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
    echo "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" >"$apt/sources.list"
    opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
        -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o APT::Sandbox::User=root
        -o Acquire::Languages=none -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false")
    apt-get "${opts[@]}" -q update >"$WORK/apt.log" 2>&1 || {
        cat "$WORK/apt.log" >&2
        die "apt-get update for Debian $DEBIAN_SUITE failed (log above)"
    }
    (cd "$apt/debs" && apt-get "${opts[@]}" -q download libc6 libstdc++6 libgcc-s1) \
        >>"$WORK/apt.log" 2>&1 || {
        cat "$WORK/apt.log" >&2
        die "apt-get download of Debian $DEBIAN_SUITE's C runtime failed (log above)"
    }
    mkdir -p "$WORK/out/glibc"
    for deb in "$apt"/debs/*.deb; do
        dpkg-deb -x "$deb" "$WORK/out/glibc"
    done
    [ -x "$WORK/out/glibc/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] \
        || die "Debian $DEBIAN_SUITE's libc6 has no ld-linux-x86-64.so.2 where expected"
    extra="private runtime: $(cd "$apt/debs" && ls -1 ./*.deb | sed 's|^\./||' | tr '\n' ' ')"
fi

# The launcher: decides at run time, so a cache carried to a machine with a newer glibc
# (e.g. a GPU host) runs the binary directly.
cat >"$WORK/out/perf_analyzer" <<'EOF'
#!/usr/bin/env bash
# Runs perf_analyzer from the wheel; see scripts/fetch_perf_analyzer.sh.
here=$(cd "$(dirname "$0")" && pwd)
glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
if [ "$(printf '%s\n2.38\n' "$glibc" | sort -V | tail -n1)" = "$glibc" ]; then
    exec "$here/bin/perf_analyzer" "$@"
fi
priv=$here/glibc/usr/lib/x86_64-linux-gnu
if [ ! -x "$priv/ld-linux-x86-64.so.2" ]; then
    echo "perf_analyzer needs glibc >= 2.38 (this machine has $glibc) and $here has no" \
        "private runtime; run scripts/fetch_perf_analyzer.sh --force here" >&2
    exit 127
fi
exec "$priv/ld-linux-x86-64.so.2" \
    --library-path "$priv:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \
    "$here/bin/perf_analyzer" "$@"
EOF
chmod +x "$WORK/out/perf_analyzer"
"$WORK/out/perf_analyzer" --version >"$WORK/version.txt" 2>&1 \
    || { cat "$WORK/version.txt" >&2; die "the fetched perf_analyzer does not start here"; }

{
    echo "$PIN"
    echo "$extra"
} >"$WORK/out/PINS.tmp"
rm -rf "$DEST"
mv "$WORK/out" "$DEST"
mv "$DEST/PINS.tmp" "$DEST/PINS"
say "done in $(($(date +%s) - start)) s: $(du -sh "$DEST" | cut -f1) in $DEST ($extra)"
