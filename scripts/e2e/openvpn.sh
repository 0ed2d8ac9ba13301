#!/usr/bin/env bash
# Client family: OpenVPN 2.6 with its client key in the token (pkcs11-helper). Run by
# run.sh.
#
#  - EC P-256 and RSA-2048 signing CMKs made with `cmkp11 key create --type`, their
#    requests (`cmkp11 key csr`) signed by a throwaway CA; each certificate stored in the
#    token next to its key (same CKA_ID; pkcs11-tool --write-object), because OpenVPN
#    finds a key through its certificate;
#  - `openvpn --show-pkcs11-ids MODULE` lists both certificates with their serialized ids;
#  - a loopback handshake without a tun device: a p2p TLS server (software key) and a
#    client with `--pkcs11-providers MODULE --pkcs11-id ID`, both `--dev null`, UDP on
#    127.0.0.1 ports of E2E_PORTS; the client's PIN is given through the management
#    interface (`--management-query-passwords`, scripts/e2e/ovpn_mgmt.py) as an operator's
#    GUI or script would; both sides reach "Initialization Sequence Completed" and the
#    server verified the client certificate from the token.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
mgmt="$(dirname "${BASH_SOURCE[0]}")/ovpn_mgmt.py"
if ! have openvpn || ! have pkcs11-tool || ! have openssl || [ ! -x "$E2E_CLI" ] || [ ! -x "$CMK_PYTHON" ]; then
    skip openvpn "openvpn, pkcs11-tool, openssl, $CMK_PYTHON or $E2E_CLI missing (scripts/setup.sh installs openvpn, opensc; cargo build --release)"
    exit 0
fi
pids=()
# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
    local p
    for p in "${pids[@]}"; do stop_pid "$p"; done
}
trap cleanup EXIT
trap 'exit 143' TERM INT

make_ca "$W" || { fail openvpn-ca "openssl could not make the test CA"; exit 0; }
p11=(pkcs11-tool --module "$E2E_MODULE" --token-label "$E2E_TOKEN" --login --pin "$E2E_PIN")
keys=()
for k in ec:ec-p256:81 rsa:rsa-2048:82; do
    IFS=: read -r name type id <<<"$k"
    if run_cli "create-$name" key create "ovpn-$name" --type "$type" --id "$id" &&
        run_cli "csr-$name" key csr "ovpn-$name" --subject "/O=cmkp11 e2e/CN=ovpn client $name" \
            --out "$W/$name.csr" &&
        ca_sign "$W" "$W/$name.csr" "$W/$name.crt" >"$W/sign-$name.log" 2>&1 &&
        run "der-$name" openssl x509 -in "$W/$name.crt" -outform DER -out "$W/$name.der" &&
        run "write-cert-$name" "${p11[@]}" --write-object "$W/$name.der" --type cert \
            --id "$id" --label "ovpn-$name"; then
        keys+=("$name")
    else
        fail "openvpn-key-$name" "$(lastlog "create-$name") $(lastlog "csr-$name") $(lastlog "sign-$name") $(lastlog "write-cert-$name")"
    fi
done
[ "${#keys[@]}" -gt 0 ] || exit 0

# --- --show-pkcs11-ids ------------------------------------------------------------------------
declare -A pid_of
if run show-ids openvpn --show-pkcs11-ids "$E2E_MODULE"; then
    ok=1
    for k in "${keys[@]}"; do
        # Each certificate is followed by its "Serialized id:" line.
        pid_of[$k]="$(awk -v cn="CN=ovpn client $k" '
            /DN:/ { found = index($0, cn) > 0 }
            /Serialized id:/ && found { print $3; exit }' "$W/show-ids.log")"
        [ -n "${pid_of[$k]}" ] || ok=0
    done
    if [ "$ok" = 1 ]; then
        pass openvpn-show-pkcs11-ids
        note "pkcs11-ids: ${pid_of[*]}"
    else
        fail openvpn-show-pkcs11-ids "not every certificate listed: $(lastlog show-ids 6)"
        exit 0
    fi
else
    fail openvpn-show-pkcs11-ids "$(lastlog show-ids)"
    exit 0
fi

# --- loopback handshake with --dev null ---------------------------------------------------------
if ! openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=ovpn server" -CA "$W/ca.crt" -CAkey "$W/ca.key" \
    -keyout "$W/server.key" -out "$W/server.crt" >"$W/server-cert.log" 2>&1; then
    fail openvpn-server-cert "$(lastlog server-cert)"
    exit 0
fi
common=(--dev null --proto udp4 --local 127.0.0.1 --ca "$W/ca.crt" --verb 3 --connect-retry-max 1
    --hand-window 30 --ping-exit 60)
for k in "${keys[@]}"; do
    name="openvpn-handshake-$k"
    read -r ps pc pm <<<"$(free_ports 3)"
    openvpn "${common[@]}" --lport "$ps" --remote 127.0.0.1 --rport "$pc" --tls-server \
        --cert "$W/server.crt" --key "$W/server.key" --dh none >"$W/server-$k.log" 2>&1 &
    spid=$!
    pids+=("$spid")
    openvpn "${common[@]}" --lport "$pc" --remote 127.0.0.1 --rport "$ps" --tls-client \
        --pkcs11-providers "$E2E_MODULE" --pkcs11-id "${pid_of[$k]}" \
        --management 127.0.0.1 "$pm" --management-query-passwords >"$W/client-$k.log" 2>&1 &
    cpid=$!
    pids+=("$cpid")
    if ! run "mgmt-$k" "$CMK_PYTHON" "$mgmt" "$pm" "$E2E_PIN" 60; then
        fail "$name" "no connection: $(lastlog "mgmt-$k" 2) / client: $(grep -vE 'WARNING|NOTE' "$W/client-$k.log" | tail -n 2 | tr '\n' ' ')"
    elif ! grep -q 'connected (PIN asked: True)' "$W/mgmt-$k.log"; then
        fail "$name" "connected without the token PIN being asked: $(lastlog "mgmt-$k" 2)"
    else
        ok=0
        for _ in $(seq 100); do
            grep -q 'Initialization Sequence Completed' "$W/server-$k.log" && ok=1 && break
            sleep 0.1
        done
        if [ "$ok" = 1 ] && grep -q "VERIFY OK: depth=0, .*CN=ovpn client $k" "$W/server-$k.log" &&
            grep -q 'Initialization Sequence Completed' "$W/client-$k.log"; then
            pass "$name"
        else
            fail "$name" "server: $(grep -E 'VERIFY|Initialization|error' "$W/server-$k.log" | tail -n 2 | tr '\n' ' ')"
        fi
    fi
    stop_pid "$cpid"
    stop_pid "$spid"
done
exit 0
