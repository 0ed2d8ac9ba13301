#!/usr/bin/env bash
# Runs the client end-to-end suite through a PKCS#11 module (cmkp11 by default).
#
#   bash scripts/e2e/run.sh [--module PATH | --direct] [--keep] [FAMILY...]
#
#   --module PATH  module under test (default: $E2E_MODULE or target/release/libcmkp11.so)
#   --direct       test SoftHSM2's own module instead (to check the suite itself)
#   --keep         keep the scratch directory (kept anyway when a check fails)
#   FAMILY         some of: pkcs11-tool python openssl gnutls nss p11-kit nginx java ssh apache
#                  curl openvpn (default: all)
#
# Every family gets its own private SoftHSM2 token and cmkp11 config in a temp dir, runs
# bounded by E2E_FAMILY_TIMEOUT seconds (default 600), and prints PASS/FAIL/SKIP lines.
# The last line is `N passed, N failed, N skipped`; the exit status is 1 if any failed.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/../lib.sh"

ALL_FAMILIES=(pkcs11-tool python openssl gnutls nss p11-kit nginx java ssh apache curl openvpn)
module="${E2E_MODULE:-}"
keep=0
families=()
while [ $# -gt 0 ]; do
    case "$1" in
    --module)
        module="$2"
        shift 2
        ;;
    --direct)
        module="$(cmk_softhsm_module)" || cmk_die "SoftHSM2 module not found"
        shift
        ;;
    --keep)
        keep=1
        shift
        ;;
    -h | --help)
        sed -n '2,15p' "$0"
        exit 0
        ;;
    -*) cmk_die "unknown option $1" ;;
    *)
        families+=("$1")
        shift
        ;;
    esac
done
if [ "${#families[@]}" -eq 0 ]; then
    for f in "${ALL_FAMILIES[@]}"; do
        [ -f "$HERE/$f.sh" ] && families+=("$f")
    done
fi
[ -n "$module" ] || module="$(cmk_module_path release)"
case "$module" in /*) ;; *) module="$PWD/$module" ;; esac
[ -f "$module" ] || cmk_die "module $module not found (cargo build --release first)"
direct="$(cmk_softhsm_module)" || cmk_die "SoftHSM2 module not found (run scripts/setup.sh)"

# Checks of cmkp11's policy are skipped when the module under test is SoftHSM2 itself.
is_direct=0
[ "$(readlink -f "$module")" = "$(readlink -f "$direct")" ] && is_direct=1

work="$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-e2e.XXXXXX")"
chmod 700 "$work"
: >"$work/results.txt"
family_timeout="${E2E_FAMILY_TIMEOUT:-600}"
start=$(date +%s)

printf 'e2e: module under test %s\n' "$module"
printf 'e2e: scratch directory %s\n' "$work"

for fam in "${families[@]}"; do
    script="$HERE/$fam.sh"
    printf '\n== %s\n' "$fam"
    if [ ! -f "$script" ]; then
        printf 'FAIL %s: no script %s\n' "$fam" "$script" | tee -a "$work/results.txt"
        continue
    fi
    fdir="$work/$fam"
    mkdir -p "$fdir"
    (
        cmk_token_env "$fdir" "e2e-$fam" >/dev/null
        export E2E_MODULE="$module" E2E_DIRECT_MODULE="$direct" E2E_WORK="$fdir" \
            E2E_TOKEN="e2e-$fam" E2E_IS_DIRECT="$is_direct"
        cd "$fdir" && exec timeout -k 10 "$family_timeout" bash "$script"
    ) 2>"$fdir/stderr.txt" | tee "$fdir/out.txt" |
        grep --line-buffered -E '^((PASS|FAIL|SKIP) |  note: )'
    rc=${PIPESTATUS[0]}
    grep -E '^(PASS|FAIL|SKIP) ' "$fdir/out.txt" >>"$work/results.txt"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        printf 'FAIL %s: timed out after %ss\n' "$fam" "$family_timeout" | tee -a "$work/results.txt"
    elif [ "$rc" -ne 0 ]; then
        printf 'FAIL %s: script exited with status %s: %s\n' "$fam" "$rc" \
            "$(tail -n 2 "$fdir/stderr.txt" | tr '\n' ' ')" | tee -a "$work/results.txt"
    elif ! grep -qE '^(PASS|FAIL|SKIP) ' "$fdir/out.txt"; then
        printf 'FAIL %s: the script reported no checks\n' "$fam" | tee -a "$work/results.txt"
    fi
done

total_pass=$(grep -c '^PASS ' "$work/results.txt" 2>/dev/null)
total_fail=$(grep -c '^FAIL ' "$work/results.txt" 2>/dev/null)
total_skip=$(grep -c '^SKIP ' "$work/results.txt" 2>/dev/null)

printf '\ne2e: finished in %s\n' "$(cmk_elapsed "$start")"
if [ "$total_fail" -gt 0 ] || [ "$keep" -eq 1 ]; then
    printf 'e2e: logs kept in %s\n' "$work"
else
    rm -rf "$work"
fi
printf '%d passed, %d failed, %d skipped\n' "$total_pass" "$total_fail" "$total_skip"
[ "$total_fail" -eq 0 ]
