#!/usr/bin/env bash
# Soak run (not CI): libcmkp11.so under 16 threads of mixed operations for 10 minutes, then
# 100 C_Initialize/C_Finalize cycles, over a throw-away SoftHSM2 token with the audit log
# on. Prints what cmkp11-soak prints (operations and errors per kind, RSS and open fds at
# start and end, audit records vs operations counted) and `cmkp11 audit verify` of the log.
# Exit status 0 only if there was no error, every count matches and the log verifies.
#
# Usage: scripts/soak.sh [cmkp11-soak options]     e.g. --minutes 1, --threads 8, --cycles 20
# Environment:
#   SOFTHSM2_MODULE  SoftHSM2 library (default /usr/lib/softhsm/libsofthsm2.so)
#   CARGO_TARGET_DIR honoured
#   KEEP=1           keep the temp dir (token, configuration, audit log) and print its path
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
softhsm=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
for tool in cargo softhsm2-util; do
    command -v "$tool" >/dev/null || { echo "soak.sh: $tool not found (run scripts/setup.sh)" >&2; exit 1; }
done
[ -f "$softhsm" ] || { echo "soak.sh: SoftHSM2 module $softhsm not found" >&2; exit 1; }

cargo build --release -p cmkp11 --lib --bins >&2
cargo build --release -p cmkp11-bench --bin cmkp11-soak >&2

dir=$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-soak.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
    echo "soak.sh: keeping $dir" >&2
else
    trap 'rm -rf "$dir"' EXIT
fi
mkdir "$dir/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$dir" >"$dir/softhsm2.conf"
(umask 077; printf '[backend]\nmodule = "%s"\n\n[audit]\nfile = "%s/audit.log"\n' "$softhsm" "$dir" >"$dir/cmkp11.toml")
pin=1234
(umask 077; echo "$pin" >"$dir/pin")
export SOFTHSM2_CONF=$dir/softhsm2.conf CMKP11_CONFIG=$dir/cmkp11.toml
softhsm2-util --init-token --free --label soak --so-pin 12345678 --pin "$pin" >/dev/null

echo "# Soak run ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), code $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
status=0
"$target/release/cmkp11-soak" --module "$target/release/libcmkp11.so" --token soak --pin "$pin" \
    --audit-log "$dir/audit.log" "$@" || status=1
echo "audit log: $(wc -l <"$dir/audit.log") records, $(du -k "$dir/audit.log" | cut -f1) KiB"
"$target/release/cmkp11" --pin-file "$dir/pin" audit verify || status=1
exit "$status"
