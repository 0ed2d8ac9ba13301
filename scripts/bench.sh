#!/usr/bin/env bash
# Benchmark: libcmkp11.so (A) against SoftHSM2 used directly (B), over the same private token.
#
# Builds cmkp11 and cmkp11-bench (release), creates a throw-away SoftHSM2 token and a cmkp11
# config in a temp dir, runs cmkp11-bench and prints its Markdown report on stdout (progress
# goes to stderr). Defaults here: 9 rounds x 0.5 s (+0.15 s warm-up) per module, case and thread
# count (1, 2): 324 worker runs, about 4 minutes on 2 cores. Many short rounds rather than a few
# long ones, because the noise is mostly between processes (see the report's "round ratios").
#
# Usage: scripts/bench.sh [cmkp11-bench options]     e.g. --rounds 15 --seconds 1
#                                                          --cases aes-keygen,rsa2048-sign
# (options given here override the defaults above)
# Environment:
#   SOFTHSM2_MODULE  SoftHSM2 library (default /usr/lib/softhsm/libsofthsm2.so)
#   BENCH_MODULE_A   module A (default <target>/release/libcmkp11.so); set it to the SoftHSM2
#                    library to measure the noise of the method (A = B, ratio ~1.0);
#                    then only cmkp11-bench is built
#   CARGO_TARGET_DIR honoured
#   KEEP=1           keep the temp dir (token, configs) and print its path
#   BENCH_AUDIT=1    the "audit on" variant: cmkp11 writes its audit log (goal >= 0.85)
#   BENCH_APP_MUTEXES=1  every worker initializes its module with application-supplied
#                    mutexes (the ones cmkp11 gives its backend): B is then SoftHSM2 with
#                    cmkp11's locking, which isolates the cost of forwarding and policy
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
softhsm=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

for tool in cargo softhsm2-util; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool not found (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$softhsm" ] || { echo "bench.sh: SoftHSM2 module $softhsm not found" >&2; exit 1; }

if [ -n "${BENCH_MODULE_A:-}" ]; then
    cargo build --release -p cmkp11-bench >&2
else
    # Only the library of cmkp11 is needed (libcmkp11.so); its CLI binary is not.
    cargo build --release -p cmkp11 --lib >&2
    cargo build --release -p cmkp11-bench >&2
fi

module_a=${BENCH_MODULE_A:-$target/release/libcmkp11.so}
[ -f "$module_a" ] || { echo "bench.sh: module A $module_a not found" >&2; exit 1; }
if [ -z "${BENCH_MODULE_A:-}" ] && command -v nm >/dev/null \
    && ! nm -D "$module_a" | grep ' T C_GetFunctionList$' >/dev/null; then
    echo "bench.sh: $module_a does not export C_GetFunctionList" >&2
    exit 1
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-bench.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
    echo "bench.sh: keeping $dir" >&2
else
    trap 'rm -rf "$dir"' EXIT
fi
mkdir "$dir/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$dir" > "$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
softhsm2-util --init-token --free --label cmkp11-bench --so-pin 12345678 --pin 1234 >/dev/null

(umask 077; printf '[backend]\nmodule = "%s"\n' "$softhsm" > "$dir/cmkp11.toml")
chmod 600 "$dir/cmkp11.toml"
# BENCH_AUDIT=1: the "audit on" variant (every CMK use appended to an audit log in the
# temp dir; SoftHSM2 directly has no audit log, so the ratio is the audit's full cost).
if [ "${BENCH_AUDIT:-0}" = 1 ]; then
    printf '\n[audit]\nfile = "%s"\n' "$dir/audit.log" >>"$dir/cmkp11.toml"
    echo "bench.sh: audit log on ($dir/audit.log)" >&2
fi
export CMKP11_CONFIG="$dir/cmkp11.toml"

name_a=cmkp11
[ -n "${BENCH_MODULE_A:-}" ] && name_a=A
echo "bench.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$target/release/cmkp11-bench" \
    --module-a "$module_a" --module-b "$softhsm" --name-a "$name_a" --name-b softhsm2 \
    --pin 1234 --token cmkp11-bench --rounds 9 --seconds 0.5 --warmup 0.15 "$@"
