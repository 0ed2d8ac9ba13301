# shellcheck shell=bash
# Sourced by every client family script under scripts/e2e/. run.sh sets the environment:
#   E2E_MODULE         the PKCS#11 module under test (normally target/release/libcmkp11.so)
#   E2E_DIRECT_MODULE  SoftHSM2's own module, for side-by-side comparisons
#   E2E_WORK           a private scratch directory for this family
#   E2E_TOKEN          the label of the family's private token
#   SOFTHSM2_CONF      the family's private SoftHSM2 configuration
#   CMKP11_CONFIG      the family's cmkp11 configuration (mode 600)
# A family script prints one line per check: `PASS name`, `FAIL name: reason` or
# `SKIP name: reason`, and keeps the details of every command in $E2E_WORK/*.log.

. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

: "${E2E_MODULE:?run through scripts/e2e/run.sh}"
: "${E2E_DIRECT_MODULE:?run through scripts/e2e/run.sh}"
: "${E2E_WORK:?run through scripts/e2e/run.sh}"
: "${E2E_TOKEN:?run through scripts/e2e/run.sh}"

export E2E_PIN="$CMK_USER_PIN"
# Bound on any single client command (seconds).
E2E_CMD_TIMEOUT="${E2E_CMD_TIMEOUT:-120}"

pass() { printf 'PASS %s\n' "$1"; }
fail() {
    local name="$1"
    shift
    printf 'FAIL %s: %s\n' "$name" "$(printf '%s' "$*" | tr '\n' ' ' | cut -c1-400)"
}
skip() { printf 'SKIP %s: %s\n' "$1" "$2"; }
# note TEXT: context shown by run.sh under the checks (not counted).
note() { printf '  note: %s\n' "$*"; }

# run LOGNAME CMD...: runs CMD bounded by E2E_CMD_TIMEOUT with stdout+stderr in
# $E2E_WORK/LOGNAME.log; returns CMD's status (124 on timeout).
run() {
    local log="$E2E_WORK/$1.log"
    shift
    printf '$ %s\n' "$*" >"$log"
    cmk_timeout "$E2E_CMD_TIMEOUT" "$@" >>"$log" 2>&1
}

# lastlog LOGNAME: the last lines of a log, for a FAIL reason.
lastlog() {
    grep -v '^\$ ' "$E2E_WORK/$1.log" 2>/dev/null | tail -n "${2:-3}" | tr '\n' ' '
}

# policy_check NAME: true when NAME, a check of cmkp11's policy, should run; prints a SKIP
# (and returns false) when the module under test is SoftHSM2 itself (run.sh --direct).
policy_check() {
    if [ "${E2E_IS_DIRECT:-0}" = 1 ]; then
        skip "$1" "checks cmkp11's policy; the module under test is SoftHSM2 itself (--direct)"
        return 1
    fi
}

# have CMD: true when CMD is on PATH.
have() { command -v "$1" >/dev/null 2>&1; }
