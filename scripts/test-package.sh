#!/usr/bin/env bash
# The package test: builds the .deb (scripts/package.sh), installs it with apt-get as on a
# fresh Debian host, starts cmkp11d the way its systemd units do (the socket bound by root
# and passed as systemd passes it, the daemon as user cmkp11 with the unit's environment
# and capability; a small launcher stands in for systemd, which is not PID 1 on a CI
# machine), runs an operator step through the admin socket and a smoke test through the
# installed module in client mode, stops the daemon and purges the package.
#
#   bash scripts/test-package.sh        (root; refuses when cmkp11 is installed already)
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CMK_ROOT" || exit 1

if [ "$(id -u)" -ne 0 ]; then
    echo "package test: skipped, it needs root (it installs and purges the package)"
    exit 0
fi
if dpkg-query -W cmkp11 >/dev/null 2>&1 || [ -e /etc/cmkp11 ]; then
    cmk_die "package test: cmkp11 is installed on this host (or /etc/cmkp11 exists); not touching it"
fi

SOCK=/run/cmkp11/cmkp11.sock
MODULE=/usr/lib/x86_64-linux-gnu/pkcs11/libcmkp11.so
APP_PIN="smoke-$$-app-pin"
work="$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-pkg.XXXXXX")"
daemon=""
fail=0
check() { # check DESCRIPTION CMD...: runs CMD, prints ok/FAIL.
    local what="$1"
    shift
    if "$@" >"$work/out" 2>&1; then
        echo "ok   $what"
    else
        echo "FAIL $what"
        sed 's/^/     | /' "$work/out"
        fail=1
    fi
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    [ -z "$daemon" ] || kill "$daemon" 2>/dev/null
    [ -z "$daemon" ] || wait "$daemon" 2>/dev/null
    if dpkg-query -W cmkp11 >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq cmkp11 >/dev/null 2>&1
    fi
    rm -rf /var/lib/cmkp11 /run/cmkp11 "$work"
    if getent passwd cmkp11 >/dev/null; then userdel cmkp11 2>/dev/null; fi
    if getent group cmkp11 >/dev/null; then groupdel cmkp11 2>/dev/null; fi
}
trap cleanup EXIT

deb="$(bash scripts/package.sh)" || cmk_die "package test: the package did not build"
echo "package: $deb ($(du -k "$deb" | cut -f1) KiB)"
check "dpkg-deb lists the binaries, units, module file, man pages" \
    sh -c "dpkg-deb -c '$deb' | grep -q ./usr/bin/cmkp11d &&
           dpkg-deb -c '$deb' | grep -q ./usr/lib/x86_64-linux-gnu/pkcs11/libcmkp11.so &&
           dpkg-deb -c '$deb' | grep -q 'lib/systemd/system/cmkp11d.socket' &&
           dpkg-deb -c '$deb' | grep -q ./usr/share/p11-kit/modules/cmkp11.module &&
           dpkg-deb -c '$deb' | grep -q ./usr/share/man/man1/cmkp11-key-create.1.gz"
check "apt-get install ./$(basename "$deb")" \
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb"
check "user cmkp11 exists" getent passwd cmkp11
# shellcheck disable=SC2317 # called through check
owner_mode() { # owner_mode PATH OWNER:GROUP:MODE
    local got
    got="$(stat -c %U:%G:%a "$1")"
    echo "$1: $got"
    [ "$got" = "$2" ]
}
check "the token PIN file is cmkp11's, mode 600" owner_mode /etc/cmkp11/token.pin cmkp11:cmkp11:600
check "the state directory is cmkp11's, mode 700" owner_mode /var/lib/cmkp11 cmkp11:cmkp11:700
check "the daemon configuration is root:cmkp11 640" owner_mode /etc/cmkp11/cmkp11d.toml root:cmkp11:640
check "the token was created" \
    env SOFTHSM2_CONF=/var/lib/cmkp11/softhsm2.conf softhsm2-util --show-slots
grep -q 'Label:.*cmkp11' "$work/out" || { echo "FAIL no token labelled cmkp11"; fail=1; }
check "man cmkp11-key-create" sh -c 'man -P cat cmkp11-key-create 2>/dev/null | grep -q "cmkp11 key create" ||
    zcat /usr/share/man/man1/cmkp11-key-create.1.gz | grep -q "key create"'
if command -v systemd-analyze >/dev/null 2>&1; then
    check "systemd-analyze verify the units" \
        systemd-analyze verify /lib/systemd/system/cmkp11d.socket /lib/systemd/system/cmkp11d.service
fi

# An application credential for this smoke test (uid 0, the PIN above) and root as an
# operator (admin).
hash="$(printf '%s' "$APP_PIN" | cmkp11d hash-pin)" || cmk_die "cmkp11d hash-pin failed"
printf '\n[[clients]]\nname = "smoke"\nuids = [0]\npin_hash = "%s"\n' "$hash" >>/etc/cmkp11/cmkp11d.toml
printf '\n[[operators]]\nname = "root"\nrole = "admin"\nuids = [0]\n' >>/etc/cmkp11/cmkp11d.toml

# As the units do: root owns the socket; the daemon runs as cmkp11 with the unit's
# environment, its one capability (CAP_SYS_PTRACE, to read another user's /proc/PID/exe)
# and its ExecStartPre check first.
unit_env=()
while IFS= read -r line; do unit_env+=("${line#Environment=}"); done \
    < <(grep '^Environment=' /lib/systemd/system/cmkp11d.service)
check "cmkp11d check (ExecStartPre)" \
    setpriv --reuid cmkp11 --regid cmkp11 --init-groups env "${unit_env[@]}" /usr/bin/cmkp11d check
install -d -m 0755 /run/cmkp11
install -d -o cmkp11 -g cmkp11 -m 0755 /run/cmkp11d # the unit's RuntimeDirectory
# systemd's socket passing (sd_listen_fds): root binds the socket (SocketMode=0666), the
# daemon gets it as fd 3 with LISTEN_FDS=1 and LISTEN_PID = its own pid (exec keeps it).
# Started at once, as the enabled service is at boot (the admin socket then exists before
# any application connects).
cat >"$work/activate.py" <<'PY'
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o666)
s.listen(128)
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
PY
"$CMK_PYTHON" "$work/activate.py" "$SOCK" \
    setpriv --reuid cmkp11 --regid cmkp11 --init-groups \
    --inh-caps=+sys_ptrace --ambient-caps=+sys_ptrace --bounding-set=-all,+sys_ptrace env "${unit_env[@]}" /usr/bin/cmkp11d \
    >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do grep -q 'cmkp11d: ready' "$work/daemon.log" 2>/dev/null && break; sleep 0.1; done

# An operator creates a CMK through the admin socket, as the README says.
ADMIN=/run/cmkp11d/admin.sock
for _ in $(seq 50); do [ -S "$ADMIN" ] && break; sleep 0.1; done
check "cmkp11 --admin-socket key create (an operator, through the daemon)" \
    cmkp11 --admin-socket "$ADMIN" key create pkg-smoke --role data
check "cmkp11 key list (the configuration names the admin socket) shows it" \
    sh -c "env -u CMKP11_CONFIG -u CMKP11_ADMIN_SOCKET cmkp11 key list | grep -q pkg-smoke"

# The smoke test: an application loads the installed module with no environment of its
# own; /etc/cmkp11/cmkp11.toml sends it to the daemon.
cat >"$work/smoke.py" <<'PY'
import sys
import PyKCS11
from PyKCS11 import PyKCS11Error, LowLevel as L

pin = sys.argv[2]
lib = PyKCS11.PyKCS11Lib()
lib.load(sys.argv[1])
slots = lib.getSlotList(tokenPresent=True)
labels = [lib.getTokenInfo(s).label.strip() for s in slots]
assert "cmkp11" in labels, labels
slot = slots[labels.index("cmkp11")]
s = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
try:
    s.login("not-the-pin")
    raise SystemExit("a wrong application PIN was accepted")
except PyKCS11Error as e:
    assert e.value == L.CKR_PIN_INCORRECT, e
s.login(pin)
key = s.generateKey([(L.CKA_CLASS, L.CKO_SECRET_KEY), (L.CKA_KEY_TYPE, L.CKK_AES),
                     (L.CKA_VALUE_LEN, 32), (L.CKA_TOKEN, False),
                     (L.CKA_ENCRYPT, True), (L.CKA_DECRYPT, True)],
                    PyKCS11.Mechanism(L.CKM_AES_KEY_GEN))
iv = bytes(range(12))
mech = PyKCS11.AES_GCM_Mechanism(iv, b"aad", 128)
ct = bytes(s.encrypt(key, b"smoke test through the installed service", mech))
pt = bytes(s.decrypt(key, ct, mech))
assert pt == b"smoke test through the installed service", pt
cmk = s.findObjects([(L.CKA_LABEL, "pkg-smoke")])
assert len(cmk) == 1, cmk
ct = bytes(s.encrypt(cmk[0], b"under the operator's CMK", mech))
assert bytes(s.decrypt(cmk[0], ct, mech)) == b"under the operator's CMK"
try:
    s.destroyObject(cmk[0])
    raise SystemExit("an application destroyed a CMK in service mode")
except PyKCS11Error as e:
    assert e.value == L.CKR_USER_NOT_LOGGED_IN, e
s.logout()
s.closeSession()
print("smoke: login, AES-GCM with a session key and the operator's CMK, CMK destruction refused: ok")
PY
check "smoke test through the installed module (client mode)" \
    env -u CMKP11_CONFIG -u CMKP11_SERVICE -u SOFTHSM2_CONF \
    "$CMK_PYTHON" "$work/smoke.py" "$MODULE" "$APP_PIN"
check "pkcs11-tool -L through the installed service" \
    sh -c "pkcs11-tool --module '$MODULE' -L | grep -q 'token label.*cmkp11'"
check "the audit log names the client by its kernel uid" \
    sh -c "grep -q '\"uid\":0' /var/lib/cmkp11/audit.log"
check "cmkp11 --admin-socket audit verify" cmkp11 --admin-socket "$ADMIN" audit verify
check "p11-kit sees the installed module" sh -c "p11-kit list-modules | grep -q cmkp11"

kill "$daemon" 2>/dev/null
wait "$daemon" 2>/dev/null
daemon=""
check "the daemon stopped and removed nothing it should keep" test -d /var/lib/cmkp11/tokens
check "apt-get purge cmkp11" env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq cmkp11
check "purge removed the binaries and /etc/cmkp11" \
    sh -c '! [ -e /usr/bin/cmkp11d ] && ! [ -e /etc/cmkp11 ] && ! [ -e '"$MODULE"' ]'
check "purge kept the token and the audit log" test -d /var/lib/cmkp11/tokens
if [ "$fail" -ne 0 ]; then
    echo "daemon log:"
    sed 's/^/     | /' "$work/daemon.log"
fi
[ "$fail" -eq 0 ] && echo "package test: all checks passed"
exit "$fail"
