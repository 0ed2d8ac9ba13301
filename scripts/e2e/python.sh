#!/usr/bin/env bash
# Client family: Python with PyKCS11 through the module under test. Run by run.sh.
# The envelope flow (wrap CMK, DEK, AES-KWP wrap/unwrap, AES-GCM) and an Oracle-TDE-style
# flow (master key by label, AES-CBC-PAD of a table key, decrypted by a second process).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

flows="$(dirname "${BASH_SOURCE[0]}")/pykcs11_flows.py"
if ! "$CMK_PYTHON" -c 'import PyKCS11' 2>/dev/null; then
    skip python "PyKCS11 not importable by $CMK_PYTHON (scripts/setup.sh installs python3-pykcs11)"
    exit 0
fi


# flow NAME ARGS...: runs one PyKCS11 process; its PASS/FAIL lines go to the output, and a
# crash or timeout without a FAIL line becomes a FAIL of its own.
flow() {
    local name="$1"
    shift
    run "py-$name" "$CMK_PYTHON" "$flows" "$@"
    local rc=$?
    grep -E '^((PASS|FAIL|SKIP) |  note: )' "$E2E_WORK/py-$name.log"
    if [ "$rc" -ne 0 ] && ! grep -q '^FAIL ' "$E2E_WORK/py-$name.log"; then
        fail "$name" "python exited with status $rc: $(lastlog "py-$name" 2)"
    fi
}

flow envelope envelope
flow tde-first-process tde-encrypt "$E2E_WORK/tde-state.json"
if [ -s "$E2E_WORK/tde-state.json" ]; then
    flow tde-second-process tde-decrypt "$E2E_WORK/tde-state.json"
fi
exit 0
