#!/usr/bin/env bash
# Runs the client end-to-end suite through a PKCS#11 module (cmkp11 by default).
#
#   bash scripts/e2e/run.sh [--module PATH | --direct] [--backend NAME] [--service] [--keep]
#                           [FAMILY...]
#
#   --module PATH  module under test (default: $E2E_MODULE or target/release/libcmkp11.so)
#   --direct       test the backend token's own module instead (to check the suite itself)
#   --backend NAME the token behind cmkp11 for the family tokens: softhsm2 (default) or
#                  kryoptic (built by scripts/setup.sh); $CMK_BACKEND sets the default
#   --service      service mode: each family's token is owned by a cmkp11d of its own
#                  (built beside the module) and the module runs in client mode
#   --keep         keep the scratch directory (kept anyway when a check fails)
#   FAMILY         some of: pkcs11-tool python openssl gnutls nss p11-kit nginx java ssh apache
#                  curl openvpn (default: all)
#
# Every family gets its own private token (SoftHSM2 unless --backend says otherwise) and cmkp11 config in a temp dir, runs
# bounded by E2E_FAMILY_TIMEOUT seconds (default 600), and prints PASS/FAIL/SKIP lines.
# The last line is `N passed, N failed, N skipped`; the exit status is 1 if any failed.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/../lib.sh"

ALL_FAMILIES=(pkcs11-tool python openssl gnutls nss p11-kit nginx java ssh apache curl openvpn)
module="${E2E_MODULE:-}"
keep=0
service=0
families=()
direct_flag=0
while [ $# -gt 0 ]; do
    case "$1" in
    --backend)
        CMK_BACKEND="$2"
        export CMK_BACKEND
        shift 2
        ;;
    --module)
        module="$2"
        shift 2
        ;;
    --direct)
        direct_flag=1
        shift
        ;;
    --keep)
        keep=1
        shift
        ;;
    --service)
        service=1
        shift
        ;;
    -h | --help)
        sed -n '2,20p' "$0"
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
direct="$(cmk_backend_module)" || cmk_die "$CMK_BACKEND module not found (run scripts/setup.sh)"
[ "$direct_flag" -eq 0 ] || module="$direct"
[ -n "$module" ] || module="$(cmk_module_path release)"
case "$module" in /*) ;; *) module="$PWD/$module" ;; esac
[ -f "$module" ] || cmk_die "module $module not found (cargo build --release first)"

# Checks of cmkp11's policy are skipped when the module under test is the token itself.
is_direct=0
[ "$(readlink -f "$module")" = "$(readlink -f "$direct")" ] && is_direct=1

work="$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-e2e.XXXXXX")"
chmod 700 "$work"
: >"$work/results.txt"
family_timeout="${E2E_FAMILY_TIMEOUT:-600}"
start=$(date +%s)

daemon="$(dirname "$module")/cmkp11d"
if [ "$service" -eq 1 ]; then
    [ "$is_direct" -eq 0 ] || cmk_die "--service tests cmkp11's client mode, not SoftHSM2"
    [ -x "$daemon" ] || cmk_die "$daemon not found (cargo build --release --bins first)"
    app_hash="$(printf '%s' "$CMK_USER_PIN" | "$daemon" hash-pin)" || cmk_die "cmkp11d hash-pin failed"
fi

# start_daemon DIR: a cmkp11d owning the family's token (its configuration plus [service],
# where applications may create keys, and one application credential: the test PIN, for root and the server users the
# families run workers as); exports CMKP11_SERVICE and prints the daemon's pid.
start_daemon() {
    local dir="$1" conf="$1/cmkp11d.toml" sock="$1/cmkp11d.sock" uids="0" u pid
    for u in www-data nobody; do
        if id -u "$u" >/dev/null 2>&1; then uids="$uids, $(id -u "$u")"; fi
    done
    (
        umask 077
        printf '%s' "$CMK_USER_PIN" >"$dir/token.pin"
        cat "$CMKP11_CONFIG"
        printf '\n[audit]\nfile = "%s"\n' "$dir/audit.log"
        # The families play applications that make their own keys (keytool, p11tool,
        # pkcs11-tool): applications_create_keys. Every other lifecycle step stays the
        # operators'.
        printf '\n[service]\nsocket = "%s"\ntoken_pin_file = "%s"\napplications_create_keys = true\n' \
            "$sock" "$dir/token.pin"
        printf '\n[[clients]]\nname = "e2e"\nuids = [%s]\npin_hash = "%s"\n' "$uids" "$app_hash"
    ) >"$conf.tmp" && mv "$conf.tmp" "$conf"
    "$daemon" --config "$conf" >/dev/null 2>"$dir/cmkp11d.log" &
    pid=$!
    for _ in $(seq 100); do
        [ -S "$sock" ] && break
        sleep 0.1
    done
    [ -S "$sock" ] || cmk_die "cmkp11d did not start: $(tail -n 3 "$dir/cmkp11d.log")"
    echo "$pid"
}

printf 'e2e: module under test %s%s, backend %s (%s)\n' "$module" \
    "$([ "$service" -eq 1 ] && echo ' (service mode)')" "$CMK_BACKEND" "$direct"
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
        export E2E_MODULE="$module" E2E_DIRECT_MODULE="$direct" E2E_WORK="$fdir" E2E_BACKEND="$CMK_BACKEND" \
            E2E_TOKEN="e2e-$fam" E2E_IS_DIRECT="$is_direct" E2E_SERVICE="$service"
        if [ "$service" -eq 0 ]; then
            cd "$fdir" && exec timeout -k 10 "$family_timeout" bash "$script"
        fi
        dpid="$(start_daemon "$fdir")" || exit 1
        export CMKP11_SERVICE="unix:$fdir/cmkp11d.sock"
        rc=0
        (cd "$fdir" && timeout -k 10 "$family_timeout" bash "$script") || rc=$?
        kill "$dpid" 2>/dev/null
        wait "$dpid" 2>/dev/null
        exit "$rc"
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
