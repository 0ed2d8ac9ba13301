#!/usr/bin/env bash
# Scale benchmark (issue 16): cmkp11 (A) against SoftHSM2 used directly (B) over a token that
# holds N CMKs, in the same run.
#
# The token with N CMKs is made once and cached: $BENCH_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/cmkp11-bench)/scale-n<N>-ks<hash of src/keystore/*.rs>, so a
# change of the keystore's code (its format) makes a new one. It holds the keys of
# `cmkp11-bench --setup` (made through cmkp11) and N data CMKs `scale-00000`.. (one made
# through cmkp11, the others generated in the token by SoftHSM2 directly with that CMK's
# template and cmkp11's id layout, at SoftHSM2's own rate). Every run works on a copy, so
# the keys a run creates or rotates never reach the cache. Never used by CI.
#
# Cases, each A then B in its own process:
#   find-among-n   C_FindObjects by CKA_LABEL, a different one of the N keys each call
#   find-by-label, aes-gcm-4k-encrypt, aes-kwp-wrap, ecdsa-p256-sign
#                  cmkp11-bench's own cases (A/B rounds) over the N-key token
#   create         CMK creations at N (token AES keys, the application's template)
#   login          C_Initialize + C_Login + first key use (find + AES-GCM), and the RSS
#                  before and after the first use: (RSS_A - RSS_B) / N = bytes per CMK
#   latency        GCM/KWP/ECDSA every call timed (p99.9, max) through cmkp11, quiet and
#                  while another process rotates, disables and enables keys (the CLI)
#   cli            `cmkp11 key list` (table and --json) and `cmkp11 key show`
#   tight          on a second token with one CMK and one EC key pair: find by label, and
#                  ECDSA with the key found before the loop (per-call cost at small scale)
#
# Usage: scripts/bench-scale.sh [--n N] [--rounds R] [--seconds S] [--skip-bench]
# Environment: SOFTHSM2_MODULE, CARGO_TARGET_DIR, BENCH_CACHE, KEEP=1 (keep the work dir).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
softhsm=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
n=1000
rounds=3
seconds=2
skip_bench=0
while [ $# -gt 0 ]; do
    case "$1" in
        --n) n=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --skip-bench) skip_bench=1; shift ;;
        *) echo "bench-scale.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

for tool in cargo softhsm2-util sha256sum; do
    command -v "$tool" >/dev/null || { echo "bench-scale.sh: $tool not found" >&2; exit 1; }
done
cargo build --release -p cmkp11 --lib --bins >&2
cargo build --release -p cmkp11-bench >&2
module_a=$target/release/libcmkp11.so
scale=$target/release/cmkp11-scale
cli=$target/release/cmkp11
pin=1234
token=cmkp11-bench

format=$(cat src/keystore/*.rs | sha256sum | cut -c1-12)
cache=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cmkp11-bench}
cached=$cache/scale-n$n-ks$format

# conf DIR: SoftHSM2 and cmkp11 configurations for the token directory DIR/tokens.
conf() {
    printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
        "$1" >"$1/softhsm2.conf"
    (umask 077; printf '[backend]\nmodule = "%s"\n' "$softhsm" >"$1/cmkp11.toml")
    export SOFTHSM2_CONF=$1/softhsm2.conf CMKP11_CONFIG=$1/cmkp11.toml
}
common=(--token "$token" --pin "$pin")

if [ ! -d "$cached" ]; then
    mkdir -p "$cache"
    build=$(mktemp -d "$cache/.build.XXXXXX")
    mkdir "$build/tokens"
    conf "$build"
    softhsm2-util --init-token --free --label "$token" --so-pin 12345678 --pin "$pin" >/dev/null
    echo "bench-scale.sh: making the token with $n CMKs in $cached (once)" >&2
    "$target/release/cmkp11-bench" --setup --module "$module_a" --token "$token" --pin "$pin" >&2
    "$scale" proto --module "$module_a" "${common[@]}" --label scale-00000 >&2
    "$scale" populate --module "$softhsm" "${common[@]}" --proto scale-00000 --n "$n" \
        --prefix scale- >&2
    seen=$("$scale" count --module "$module_a" "${common[@]}")
    echo "bench-scale.sh: cmkp11 sees $seen" >&2
    rm -f "$build/softhsm2.conf" "$build/cmkp11.toml"
    mv "$build" "$cached"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-scale.XXXXXX")
churn_pid=
cleanup() {
    if [ -n "$churn_pid" ]; then kill "$churn_pid" 2>/dev/null || true; fi
    if [ "${KEEP:-0}" = 1 ]; then echo "bench-scale.sh: keeping $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
cp -a "$cached/tokens" "$work/tokens"
conf "$work"
export CMKP11_PIN=$pin

echo "# Scale benchmark, N = $n CMKs ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), code $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
both() { # both CMD ARGS...: the same step through A then B
    local c=$1; shift
    echo "- $c cmkp11:   $("$scale" "$c" --module "$module_a" "${common[@]}" "$@")"
    echo "- $c softhsm2: $("$scale" "$c" --module "$softhsm" "${common[@]}" "$@")"
}

echo "## Find by CKA_LABEL among $n (a different key each call)"
for _ in $(seq "$rounds"); do both find --prefix scale- --n "$n" --seconds "$seconds"; done

echo "## C_Initialize + C_Login + first key use (and RSS)"
for _ in $(seq "$rounds"); do both login --label scale-00001; done

echo "## CMK creation at $n CMKs (50 each)"
both create --count 50

# ms CMD...: wall time of a command in ms (its output discarded).
ms() {
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000000))
}
echo "## cmkp11 CLI at $n CMKs (ms, $rounds runs)"
for _ in $(seq "$rounds"); do
    echo "- key list: $(ms "$cli" key list) ms, key list --json: $(ms "$cli" --json key list) ms, key show: $(ms "$cli" key show scale-00042) ms"
done

echo "## Latency through cmkp11, quiet vs while another process rotates/disables keys"
lat() { for c in gcm kwp ecdsa; do echo "- $1 $("$scale" latency --module "$module_a" "${common[@]}" --case $c --seconds "$seconds")"; done; }
lat quiet
(
    i=0
    while :; do
        k=$(printf 'scale-%05d' $((i % n)))
        "$cli" key rotate "$k" >/dev/null 2>&1 || true
        "$cli" key disable "$k" >/dev/null 2>&1 || true
        "$cli" key enable "$k" >/dev/null 2>&1 || true
        i=$((i + 1))
    done
) &
churn_pid=$!
sleep 1
lat churn
kill "$churn_pid" 2>/dev/null || true
wait "$churn_pid" 2>/dev/null || true
churn_pid=
echo "- latency quiet (SoftHSM2 directly):"
for c in gcm kwp ecdsa; do echo "  - $("$scale" latency --module "$softhsm" "${common[@]}" --case $c --seconds "$seconds")"; done

echo "## Tight small-scale cases: a token with one CMK and one EC key pair"
# A find that matches one key among few (the independent benchmark's ~90k finds/s case)
# and a sign with a key already found.
mkdir "$work/small" "$work/small/tokens"
conf "$work/small"
softhsm2-util --init-token --free --label "$token" --so-pin 12345678 --pin "$pin" >/dev/null
"$scale" proto --module "$module_a" "${common[@]}" --label tight-00000 >/dev/null
"$scale" ec --module "$module_a" "${common[@]}" >/dev/null
for _ in $(seq "$rounds"); do
    both find --prefix tight- --n 1 --seconds "$seconds"
    both latency --case ecdsa --seconds "$seconds"
done
conf "$work"

if [ "$skip_bench" = 0 ]; then
    echo "## cmkp11-bench cases over the token with $n CMKs"
    "$target/release/cmkp11-bench" --module-a "$module_a" --module-b "$softhsm" --name-a cmkp11 \
        --name-b softhsm2 --pin "$pin" --token "$token" --rounds "$rounds" --seconds 0.5 \
        --warmup 0.3 --threads 1 --cases find-by-label,aes-gcm-4k-encrypt,aes-kwp-wrap,ecdsa-p256-sign
fi
