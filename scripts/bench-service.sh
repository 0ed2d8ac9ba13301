#!/usr/bin/env bash
# Benchmark of service mode: cmkp11d + libcmkp11.so in client mode, and p11-kit's RPC
# (p11-kit server + p11-kit-client.so), each against SoftHSM2 used directly, over the same
# private token and in the same run (cmkp11-bench, same method as scripts/bench.sh; library
# mode's ratio against SoftHSM2 directly is in scripts/bench.sh's report, ~1.0).
#
# Usage: scripts/bench-service.sh [cmkp11-bench options]   e.g. --rounds 5 --cases aes-gcm-4k-encrypt
# Environment: SOFTHSM2_MODULE, CARGO_TARGET_DIR, KEEP=1 as for scripts/bench.sh;
#   NO_P11KIT=1 skips the p11-kit part; P11KIT_CASES overrides its cases.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
softhsm=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

cargo build --release -p cmkp11 --lib --bin cmkp11d >&2
cargo build --release -p cmkp11-bench >&2

dir=$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-bench-svc.XXXXXX")
pids=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "bench-service.sh: kept $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT
mkdir "$dir/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$dir" >"$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
softhsm2-util --init-token --free --label cmkp11-bench --so-pin 12345678 --pin 1234 >/dev/null

# The daemon: token PIN 1234 from a 0600 file; the application credential is also 1234 so
# that the same --pin serves both modules of the A/B run. The benchmark makes its own
# token keys, as an application of library mode does: applications_create_keys.
(
    umask 077
    printf '1234' >"$dir/token.pin"
    hash=$(printf '1234' | "$target/release/cmkp11d" hash-pin)
    printf '[backend]\nmodule = "%s"\n\n[service]\nsocket = "%s"\ntoken_pin_file = "%s"\napplications_create_keys = true\n\n[[clients]]\nname = "bench"\nuids = [%s]\npin_hash = "%s"\n' \
        "$softhsm" "$dir/cmkp11d.sock" "$dir/token.pin" "$(id -u)" "$hash" >"$dir/cmkp11d.toml"
)
"$target/release/cmkp11d" --config "$dir/cmkp11d.toml" 2>"$dir/cmkp11d.log" &
pids+=("$!")
for _ in $(seq 100); do [ -S "$dir/cmkp11d.sock" ] && break; sleep 0.1; done
[ -S "$dir/cmkp11d.sock" ] || { cat "$dir/cmkp11d.log" >&2; exit 1; }

echo "bench-service.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "## cmkp11 service mode (A) vs SoftHSM2 directly (B)"
# cmkp11-bench exits 1 when a case misses library mode's goals, which do not apply here:
# go on to the p11-kit part regardless, and end with the first part's status.
status=0
CMKP11_SERVICE="unix:$dir/cmkp11d.sock" "$target/release/cmkp11-bench" \
    --module-a "$target/release/libcmkp11.so" --module-b "$softhsm" --name-a service --name-b softhsm2 \
    --pin 1234 --token cmkp11-bench --rounds 5 --seconds 0.5 --warmup 0.15 "$@" || status=$?

client=""
for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
    [ -f "$d/pkcs11/p11-kit-client.so" ] && client="$d/pkcs11/p11-kit-client.so" && break
done
if [ "${NO_P11KIT:-0}" = 1 ] || [ -z "$client" ] || ! command -v p11-kit >/dev/null; then
    echo "bench-service.sh: p11-kit part skipped" >&2
    exit "$status"
fi
p11-kit server -f -n "$dir/p11kit.sock" --provider "$softhsm" "pkcs11:token=cmkp11-bench" \
    >"$dir/p11kit.log" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do [ -S "$dir/p11kit.sock" ] && break; sleep 0.1; done
echo
echo "## p11-kit RPC (A: p11-kit server + p11-kit-client.so) vs SoftHSM2 directly (B)"
# Only the cases p11-kit 0.24 can carry (it has no AES-GCM or AES-KWP parameters): this
# list comes after the caller's options and wins over a --cases among them.
P11_KIT_SERVER_ADDRESS="unix:path=$dir/p11kit.sock" "$target/release/cmkp11-bench" \
    --module-a "$client" --module-b "$softhsm" --name-a p11-kit --name-b softhsm2 \
    --pin 1234 --token cmkp11-bench --rounds 5 --seconds 0.5 --warmup 0.15 "$@" \
    --cases "${P11KIT_CASES:-aes-keygen,rsa2048-sign,ecdsa-p256-sign,find-by-label,open-close-session}" ||
    status=$?
exit "$status"
