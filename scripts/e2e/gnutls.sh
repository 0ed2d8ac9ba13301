#!/usr/bin/env bash
# Client family: GnuTLS's p11tool and certtool with --provider = the module under test.
# Run by run.sh. The self-signed certificate is checked by openssl in software.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
if ! have p11tool || ! have certtool || ! have openssl; then
    skip gnutls "p11tool/certtool or openssl missing (scripts/setup.sh installs gnutls-bin, openssl)"
    exit 0
fi
export GNUTLS_PIN="$E2E_PIN"
tok="pkcs11:token=$E2E_TOKEN"
p11=(p11tool --provider "$E2E_MODULE")

# --- key generation through p11tool ------------------------------------------------------
rsa_ok=0 ec_ok=0
if run keygen-rsa "${p11[@]}" --login --generate-privkey rsa --bits 2048 --label gnutls-rsa \
    --id 31 --mark-sign "$tok"; then
    pass p11tool-generate-rsa-2048
    rsa_ok=1
else
    fail p11tool-generate-rsa-2048 "$(lastlog keygen-rsa)"
fi
if run keygen-ec "${p11[@]}" --login --generate-privkey ecdsa --curve secp256r1 \
    --label gnutls-ec --id 32 --mark-sign "$tok"; then
    pass p11tool-generate-ecdsa-p256
    ec_ok=1
else
    fail p11tool-generate-ecdsa-p256 "$(lastlog keygen-ec)"
fi

# --- listing ----------------------------------------------------------------------------
if run list-tokens "${p11[@]}" --list-tokens && grep -q "Label: $E2E_TOKEN" "$W/list-tokens.log"; then
    pass p11tool-list-tokens
else
    fail p11tool-list-tokens "token '$E2E_TOKEN' not listed: $(lastlog list-tokens)"
fi
if run list-all "${p11[@]}" --login --list-all "$tok"; then
    missing=""
    for l in gnutls-rsa gnutls-ec; do
        [ "$([ $l = gnutls-rsa ] && echo $rsa_ok || echo $ec_ok)" = 1 ] || continue
        grep -q "Label: $l" "$W/list-all.log" || missing="$missing $l"
    done
    if grep -q "Type: Private key" "$W/list-all.log" && [ -z "$missing" ]; then
        pass p11tool-list-all
    else
        fail p11tool-list-all "objects missing from the listing:${missing:- private keys}"
    fi
else
    fail p11tool-list-all "$(lastlog list-all)"
fi

# --- signatures: p11tool --test-sign signs and verifies with the token's public key -------
for kind in rsa ec; do
    [ "$([ $kind = rsa ] && echo $rsa_ok || echo $ec_ok)" = 1 ] || continue
    if run "test-sign-$kind" "${p11[@]}" --login --test-sign "$tok;object=gnutls-$kind;type=private" &&
        grep -q "Verifying against public key in the token... ok" "$W/test-sign-$kind.log"; then
        pass "p11tool-test-sign-$kind"
    else
        fail "p11tool-test-sign-$kind" "$(lastlog "test-sign-$kind")"
    fi
done

# --- certtool: self-signed certificate with a token key, verified by openssl -------------
cat >"$W/cert.tmpl" <<'EOF'
cn = "cmkp11 e2e gnutls"
serial = 1
expiration_days = 2
signing_key
ca
EOF
for kind in rsa ec; do
    [ "$([ $kind = rsa ] && echo $rsa_ok || echo $ec_ok)" = 1 ] || continue
    name="certtool-self-signed-$kind"
    key="$tok;object=gnutls-$kind"
    if ! run "cert-$kind" certtool --provider "$E2E_MODULE" --generate-self-signed \
        --load-privkey "$key;type=private" --load-pubkey "$key;type=public" \
        --template "$W/cert.tmpl" --outfile "$W/$kind.crt"; then
        fail "$name" "$(lastlog "cert-$kind")"
    elif ! run "verify-$kind" openssl verify -CAfile "$W/$kind.crt" "$W/$kind.crt"; then
        fail "$name" "openssl verify refused the certificate: $(lastlog "verify-$kind")"
    elif ! run "pub-$kind" "${p11[@]}" --export-pubkey "$key;type=public" --outfile "$W/$kind.pub" ||
        ! cmp -s <(openssl pkey -pubin -in "$W/$kind.pub" 2>/dev/null) \
            <(openssl x509 -in "$W/$kind.crt" -noout -pubkey); then
        fail "$name" "the certificate's public key is not the token key's"
    else
        pass "$name"
    fi
done
exit 0
