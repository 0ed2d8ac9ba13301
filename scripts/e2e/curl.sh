#!/usr/bin/env bash
# Client family: curl client-certificate authentication with a token key. Run by run.sh.
#
# The server is `openssl s_server -Verify 1 -verify_return_error` (a software key: the
# client is under test) on 127.0.0.1, a port of E2E_PORTS: it refuses any connection
# without a client certificate issued by the test CA and, with -www, answers with a page
# naming the client certificate it verified.
# The client keys (EC P-256 and RSA-2048) are signing CMKs made with `cmkp11 key create
# --type`, their requests by `cmkp11 key csr`, signed by the test CA. curl (OpenSSL 3)
# takes the key as a PKCS#11 URI through libp11's engine (OPENSSL_CONF, MODULE_PATH = the
# module under test): `--key pkcs11:...` alone (curl picks the engine for a pkcs11: URI)
# and the explicit `--engine pkcs11 --key-type ENG`.
# Checks: each key over TLS 1.3, the EC key over TLS 1.2; the server names the client's
# certificate; without a client key curl is refused with "alert certificate required".
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
if ! have curl || ! have openssl || [ ! -f "$(engine_path)" ] || [ ! -x "$E2E_CLI" ]; then
    skip curl "curl, openssl, libp11's engine or $E2E_CLI missing (scripts/setup.sh installs curl, libengine-pkcs11-openssl; cargo build --release)"
    exit 0
fi
spid=""
# shellcheck disable=SC2317 # the EXIT trap
cleanup() { [ -n "$spid" ] && stop_pid "$spid"; }
trap cleanup EXIT
trap 'exit 143' TERM INT

make_ca "$W" || { fail curl-ca "openssl could not make the test CA"; exit 0; }
keys=()
for k in ec:ec-p256:71 rsa:rsa-2048:72; do
    IFS=: read -r name type id <<<"$k"
    if run_cli "create-$name" key create "curl-$name" --type "$type" --id "$id" &&
        run_cli "csr-$name" key csr "curl-$name" --subject "/O=cmkp11 e2e/CN=curl client $name" \
            --out "$W/$name.csr" &&
        ca_sign "$W" "$W/$name.csr" "$W/$name.crt" >"$W/sign-$name.log" 2>&1; then
        keys+=("$name")
    else
        fail "curl-client-key-$name" "$(lastlog "create-$name") $(lastlog "csr-$name") $(lastlog "sign-$name")"
    fi
done
[ "${#keys[@]}" -gt 0 ] || exit 0

# The server: software key, certificate for localhost from the same CA.
if ! openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost -CA "$W/ca.crt" -CAkey "$W/ca.key" \
    -keyout "$W/server.key" -out "$W/server.crt" >"$W/server-cert.log" 2>&1; then
    fail curl-server "$(lastlog server-cert)"
    exit 0
fi
read -r port <<<"$(free_ports 1)"
openssl s_server -accept "127.0.0.1:$port" -cert "$W/server.crt" -key "$W/server.key" \
    -CAfile "$W/ca.crt" -Verify 1 -verify_return_error -www >"$W/s_server.log" 2>&1 &
spid=$!
if ! wait_port "$port" 20; then
    fail curl-server "openssl s_server did not listen on 127.0.0.1:$port: $(tail -n 2 "$W/s_server.log")"
    exit 0
fi

engine_cnf "$W/openssl.cnf" "$E2E_MODULE"
uri() { printf 'pkcs11:token=%s;object=curl-%s;type=private;pin-value=%s' "$E2E_TOKEN" "$1" "$E2E_PIN"; }
base=(env OPENSSL_CONF="$W/openssl.cnf" curl -sS -v --max-time 20 --cacert "$W/ca.crt"
    --resolve "localhost:$port:127.0.0.1")

# client NAME KEY TLSVER [CURL ARGS...]: the page fetched with the token key; the server
# must have verified the client certificate of KEY.
client() {
    local name="$1" key="$2" v="$3"
    shift 3
    if ! run "$name" "${base[@]}" --tlsv"$v" --tls-max "$v" "$@" --key "$(uri "$key")" \
        --cert "$W/$key.crt" -o "$W/page-$name" "https://localhost:$port/"; then
        fail "$name" "curl failed: $(grep -E '^curl' "$W/$name.log" | tail -n 1) / $(tail -n 1 "$W/s_server.log")"
    elif ! grep -q "SSL connection using TLSv$v " "$W/$name.log"; then
        fail "$name" "curl did not report TLSv$v"
    elif ! grep -q "Subject: .*CN=curl client $key\$" "$W/page-$name"; then
        fail "$name" "the server did not name the client certificate: $(grep -i -m1 'certificate' "$W/page-$name")"
    else
        pass "$name"
    fi
}
for k in "${keys[@]}"; do
    client "curl-client-cert-tls13-$k" "$k" 1.3
done
if [[ " ${keys[*]} " == *" ec "* ]]; then
    client curl-client-cert-tls12-ec ec 1.2
    client curl-client-cert-engine-option-ec ec 1.3 --engine pkcs11 --key-type ENG
fi

# The server really requires the certificate.
if run curl-no-client-cert "${base[@]}" --tlsv1.3 -o "$W/page-none" "https://localhost:$port/"; then
    fail curl-no-client-cert "the server answered without a client certificate"
elif grep -q 'alert certificate required' "$W/curl-no-client-cert.log"; then
    pass curl-no-client-cert
else
    fail curl-no-client-cert "unexpected failure: $(lastlog curl-no-client-cert 1)"
fi
exit 0
