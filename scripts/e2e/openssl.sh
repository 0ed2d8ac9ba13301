#!/usr/bin/env bash
# Client family: OpenSSL 3 with libp11's pkcs11 engine (MODULE_PATH = the module under
# test), keys addressed by PKCS#11 URI. Run by run.sh. Every signature and the
# certificate are checked by openssl in software, without the engine.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
enginesdir="$(openssl version -e 2>/dev/null | sed -E 's/^ENGINESDIR: "(.*)"$/\1/')"
engine="$enginesdir/pkcs11.so"
if ! have openssl || [ ! -f "$engine" ] || ! have pkcs11-tool; then
    skip openssl "openssl, libp11's engine ($engine) or pkcs11-tool missing (scripts/setup.sh installs libengine-pkcs11-openssl, opensc)"
    exit 0
fi

cat >"$W/openssl.cnf" <<EOF
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
dynamic_path = $engine
MODULE_PATH = $E2E_MODULE
init = 0
EOF

# eng ARGS...: openssl with the engine configuration (only for commands using the token).
eng=(env OPENSSL_CONF="$W/openssl.cnf" openssl)
uri() { printf 'pkcs11:token=%s;id=%s;type=%s;pin-value=%s' "$E2E_TOKEN" "$1" "$2" "$E2E_PIN"; }
p11=(pkcs11-tool --module "$E2E_MODULE" --token-label "$E2E_TOKEN" --login --pin "$E2E_PIN")

# --- keys (made with pkcs11-tool through the same module) --------------------------------
rsa_ok=0 ec_ok=0
if run keygen-rsa "${p11[@]}" --keypairgen --key-type rsa:2048 --label ossl-rsa --id 21 &&
    run read-rsa "${p11[@]}" --read-object --type pubkey --id 21 -o "$W/rsa.der" &&
    run pem-rsa openssl pkey -pubin -inform DER -in "$W/rsa.der" -out "$W/rsa.pem"; then
    rsa_ok=1
else
    fail openssl-rsa-key "could not make and export an RSA key: $(lastlog keygen-rsa) $(lastlog read-rsa)"
fi
if run keygen-ec "${p11[@]}" --keypairgen --key-type EC:prime256v1 --label ossl-ec --id 22 &&
    run read-ec "${p11[@]}" --read-object --type pubkey --id 22 -o "$W/ec.der" &&
    run pem-ec openssl pkey -pubin -inform DER -in "$W/ec.der" -out "$W/ec.pem"; then
    ec_ok=1
else
    fail openssl-ec-key "could not make and export an EC key: $(lastlog keygen-ec) $(lastlog read-ec)"
fi

head -c 4096 /dev/urandom >"$W/data"
openssl dgst -sha256 -binary "$W/data" >"$W/data.sha256"
head -c 32 /dev/urandom >"$W/other.sha256"

# sign_check NAME ID KEYPEM [PKEYOPTS...]: engine pkeyutl -sign of data.sha256 with the
# token key, then software pkeyutl -verify; a signature over other data must not verify.
sign_check() {
    local name="$1" id="$2" pem="$3"
    shift 3
    if ! run "sign-$name" "${eng[@]}" pkeyutl -engine pkcs11 -keyform engine -sign \
        -inkey "$(uri "$id" private)" -in "$W/data.sha256" -out "$W/sig-$name" "$@"; then
        fail "$name" "engine signing failed: $(lastlog "sign-$name")"
    elif ! run "verify-$name" openssl pkeyutl -verify -pubin -inkey "$W/$pem" \
        -in "$W/data.sha256" -sigfile "$W/sig-$name" "$@"; then
        fail "$name" "software verification failed: $(lastlog "verify-$name")"
    elif run "verify-other-$name" openssl pkeyutl -verify -pubin -inkey "$W/$pem" \
        -in "$W/other.sha256" -sigfile "$W/sig-$name" "$@"; then
        fail "$name" "the signature also verified over other data (check is broken)"
    else
        pass "$name"
    fi
}

if [ "$rsa_ok" = 1 ]; then
    sign_check engine-pkeyutl-sign-rsa-pkcs1 %21 rsa.pem -pkeyopt digest:sha256
    sign_check engine-pkeyutl-sign-rsa-pss %21 rsa.pem -pkeyopt digest:sha256 \
        -pkeyopt rsa_padding_mode:pss -pkeyopt rsa_pss_saltlen:32 -pkeyopt rsa_mgf1_md:sha256
fi
if [ "$ec_ok" = 1 ]; then
    sign_check engine-pkeyutl-sign-ecdsa %22 ec.pem
fi

# --- self-signed certificates with token keys ----------------------------------------------
# cert_check NAME ID KEYPEM: req -x509 signed by the token key; openssl verify accepts it
# as self-signed and its public key is the token's.
cert_check() {
    local name="$1" id="$2" pem="$3"
    if ! run "req-$name" "${eng[@]}" req -new -x509 -engine pkcs11 -keyform engine \
        -key "$(uri "$id" private)" -subj "/CN=cmkp11 e2e $name" -days 2 -sha256 \
        -out "$W/$name.crt"; then
        fail "$name" "req -x509 failed: $(lastlog "req-$name")"
    elif ! run "verify-$name" openssl verify -CAfile "$W/$name.crt" "$W/$name.crt"; then
        fail "$name" "openssl verify refused the certificate: $(lastlog "verify-$name")"
    elif ! cmp -s <(openssl x509 -in "$W/$name.crt" -noout -pubkey) <(openssl pkey -pubin -in "$W/$pem"); then
        fail "$name" "the certificate's public key is not the token key's"
    else
        pass "$name"
    fi
}
[ "$rsa_ok" = 1 ] && cert_check engine-req-x509-rsa %21 rsa.pem
[ "$ec_ok" = 1 ] && cert_check engine-req-x509-ec %22 ec.pem

# --- RSA-OAEP decryption with the token key --------------------------------------------
# SHA-1: SoftHSM2 2.6 implements CKM_RSA_PKCS_OAEP with SHA-1/MGF1-SHA1 and no label only.
# (For other hashes libp11 falls back to raw RSA (CKM_RSA_X_509) and unpads in software;
# cmkp11's policy does not offer raw RSA, so that fallback is refused.)
if [ "$rsa_ok" = 1 ]; then
    oaep=(-pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 -pkeyopt rsa_mgf1_md:sha1)
    head -c 32 /dev/urandom >"$W/secret"
    if ! run oaep-enc openssl pkeyutl -encrypt -pubin -inkey "$W/rsa.pem" -in "$W/secret" \
        -out "$W/secret.enc" "${oaep[@]}"; then
        fail engine-pkeyutl-decrypt-rsa-oaep-sha1 "software encryption failed: $(lastlog oaep-enc)"
    elif ! run oaep-dec "${eng[@]}" pkeyutl -engine pkcs11 -keyform engine -decrypt \
        -inkey "$(uri %21 private)" -in "$W/secret.enc" -out "$W/secret.dec" "${oaep[@]}"; then
        fail engine-pkeyutl-decrypt-rsa-oaep-sha1 "engine decryption failed: $(lastlog oaep-dec)"
    elif ! cmp -s "$W/secret" "$W/secret.dec"; then
        fail engine-pkeyutl-decrypt-rsa-oaep-sha1 "decrypted bytes differ from the plaintext"
    else
        pass engine-pkeyutl-decrypt-rsa-oaep-sha1
    fi
fi
exit 0
