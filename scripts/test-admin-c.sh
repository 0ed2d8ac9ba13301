#!/usr/bin/env bash
# Compiles tests/c/admin_test.c (a C application of the "cmkp11 admin" vendor interface,
# include/cmkp11.h) with `cc` and runs it against the built module on a private SoftHSM2
# token. Prints the program's PASS/FAIL lines; exits non-zero when a check failed.
#
#   scripts/test-admin-c.sh [MODULE]     (default: the newest built libcmkp11.so)
#
# Needs a PKCS#11 header: $PKCS11_INCLUDE (a directory holding pkcs11.h), else the one of
# libp11-kit-dev (/usr/include/p11-kit-1/p11-kit). Without one it prints SKIP and exits 0.
set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

inc="${PKCS11_INCLUDE:-/usr/include/p11-kit-1/p11-kit}"
if [ ! -f "$inc/pkcs11.h" ]; then
    echo "SKIP: no pkcs11.h in $inc (install libp11-kit-dev, or set PKCS11_INCLUDE)"
    exit 0
fi
if ! command -v cc >/dev/null 2>&1; then
    echo "SKIP: no C compiler (cc)"
    exit 0
fi

module="${1:-}"
if [ -z "$module" ]; then
    module="$(cmk_find_module)" || cmk_die "no built libcmkp11.so (run cargo build)"
fi
cmk_module_ready "$module" || cmk_die "$module does not export C_GetFunctionList (run cargo build)"

work="$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-admin-c.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cc -std=c99 -Wall -Wextra -Werror -O1 \
    -I "$CMK_ROOT/include" -I "$inc" \
    -o "$work/admin_test" "$CMK_ROOT/tests/c/admin_test.c" -ldl

cmk_token_env "$work" cmkp11-test
CMKP11_TEST_PIN="$CMK_USER_PIN" cmk_timeout 120 "$work/admin_test" "$module"
