#!/usr/bin/env bash
# The operator part of the demo, with the `cmkp11` command, on the token whose config is
# $CMKP11_CONFIG (SOFTHSM2_CONF set too): create a CMK, encrypt a file, rotate, decrypt the
# old file, schedule deletion and cancel it, then verify the audit log, make a one-byte
# edit and see verification fail, and restore the log.
#
#   CMKP11_PIN=1234 bash scripts/demo-cli.sh DIR     (DIR holds the token and the config)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

dir="${1:?usage: demo-cli.sh DIR}"
cli="$(cmk_target_dir)/release/cmkp11"
[ -x "$cli" ] || cmk_die "$cli was not built (cargo build --release)"
: "${CMKP11_PIN:?set CMKP11_PIN to the user PIN}"
export CMKP11_PIN
log="$dir/audit.log"
grep -q '^\[audit\]' "$CMKP11_CONFIG" || printf '\n[audit]\nfile = "%s"\n' "$log" >>"$CMKP11_CONFIG"

say() { printf '\n### %s\n' "$*"; }
key=demo-files
say "a CMK for files (reused on later runs)"
if "$cli" key show "$key" >/dev/null 2>&1; then
    "$cli" key enable "$key" >/dev/null 2>&1 || true
else
    "$cli" key create "$key" --role wrap
fi
say "encrypt a file (envelope: a DEK made in the token, wrapped by the CMK)"
head -c 300000 /dev/urandom >"$dir/report.bin"
"$cli" encrypt --key "$key" --force "$dir/report.bin" "$dir/report.bin.cmk"
say "rotate, then decrypt the file made before the rotation"
"$cli" key rotate "$key"
"$cli" decrypt --force "$dir/report.bin.cmk" "$dir/report.out"
cmp "$dir/report.bin" "$dir/report.out" && echo "the decrypted file matches the original"
say "schedule deletion, then cancel it (the key comes back disabled), enable it again"
"$cli" key schedule-deletion "$key" --days 7
"$cli" key cancel-deletion "$key"
"$cli" key enable "$key"
"$cli" key list
say "verify the audit log"
"$cli" audit verify
say "a one-byte edit of the audit log is caught"
cp "$log" "$log.bak"
# Flip one character of the last record's operation name.
python3 - "$log" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
i = b.rindex(b'"op":"') + 6
b[i] = ord("X") if b[i] != ord("X") else ord("Y")
open(p, "wb").write(b)
PY
if "$cli" audit verify; then
    mv "$log.bak" "$log"
    cmk_die "the edited audit log verified"
fi
mv "$log.bak" "$log"
echo "(verification failed as it must; the original log is restored)"
