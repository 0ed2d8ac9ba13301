#!/usr/bin/env bash
# Client family: Java (JDK 17) SunPKCS11 with `library` = the module under test. Run by
# run.sh.
#  - keytool -list on the token; keytool -genkeypair RSA and EC into the token (SunPKCS11
#    makes a session key pair and copies the private key into the token with CKA_TOKEN and
#    CKA_ID, then stores the self-signed certificate with the same CKA_ID); both listed as
#    PrivateKeyEntry; the certificates, signed by the token keys, verified by openssl;
#  - scripts/e2e/java/Pkcs11E2E.java (compiled here): SHA256withRSA, RSASSA-PSS and
#    SHA256withECDSA by the token keys verified by the software providers (SunRsaSign,
#    SunEC); AES-GCM and AES/CBC/PKCS5Padding with a session AES key from KeyGenerator;
#  - policy (cmkp11 only): a private key made in software cannot enter the token (keytool
#    -genkeypair without -providerName, keytool -importkeystore from PKCS#12: both import key
#    material with C_CreateObject), and key values are never readable.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
src="$(dirname "${BASH_SOURCE[0]}")/java/Pkcs11E2E.java"
if ! have java || ! have javac || ! have keytool || ! have pkcs11-tool || ! have openssl; then
    skip java "java, javac, keytool (openjdk-17-jdk-headless), pkcs11-tool or openssl missing (scripts/setup.sh installs them)"
    exit 0
fi

# The token's slot as the module under test numbers it (SunPKCS11 has no token label
# setting; slotListIndex would depend on the order of slots).
run slots pkcs11-tool --module "$E2E_MODULE" --list-slots
slot="$(awk -v tok="$E2E_TOKEN" '
    /^Slot [0-9]+ \(0x[0-9a-f]+\)/ { id = $3; gsub(/[():]/, "", id) }
    $1 == "token" && $2 == "label" && $4 == tok { print id; exit }' "$W/slots.log")"
if [ -z "$slot" ]; then
    fail java-config "token $E2E_TOKEN not found by pkcs11-tool: $(lastlog slots)"
    exit 0
fi
cat >"$W/pkcs11.cfg" <<EOF
name = cmkp11e2e
library = $E2E_MODULE
slot = $((slot))
EOF

ks=(-keystore NONE -storetype PKCS11 -addprovider SunPKCS11 -providerArg "$W/pkcs11.cfg"
    -storepass "$E2E_PIN")

# --- keytool ------------------------------------------------------------------------------
if run keytool-list-empty keytool -list "${ks[@]}" && grep -q 'Your keystore contains 0 entries' "$W/keytool-list-empty.log"; then
    pass java-keytool-list
else
    fail java-keytool-list "$(lastlog keytool-list-empty)"
fi

aliases=()
# genkeypair NAME ALIAS ARGS...: keytool -genkeypair into the token; the certificate it makes
# (signed by the new token key) exported and verified by openssl as self-signed; the private
# key and certificate objects share a CKA_ID (pkcs11-tool's listing).
genkeypair() {
    local name="$1" alias="$2"
    shift 2
    if ! run "genkeypair-$name" keytool -genkeypair -alias "$alias" -dname "CN=cmkp11 e2e java $name" \
        -validity 2 "$@" "${ks[@]}"; then
        fail "java-keytool-genkeypair-$name" "$(lastlog "genkeypair-$name")"
        return
    fi
    pass "java-keytool-genkeypair-$name"
    if ! run "exportcert-$name" keytool -exportcert -rfc -alias "$alias" -file "$W/$name.crt" "${ks[@]}"; then
        fail "java-keytool-cert-$name" "keytool -exportcert failed: $(lastlog "exportcert-$name")"
    elif ! run "verify-$name" openssl verify -CAfile "$W/$name.crt" "$W/$name.crt"; then
        fail "java-keytool-cert-$name" "openssl refused the certificate signed by the token key: $(lastlog "verify-$name")"
    else
        pass "java-keytool-cert-$name"
    fi
    aliases+=("$alias")
}
# -providerName makes keytool generate the key pair with SunPKCS11, i.e. in the token.
# Without it keytool 17 generates an RSA key in software (SunRsaSign) and imports it with
# C_CreateObject: that plaintext import is refused by cmkp11 (checked below).
prov=(-providerName SunPKCS11-cmkp11e2e)
genkeypair rsa java-rsa -keyalg RSA -keysize 2048 -sigalg SHA256withRSA "${prov[@]}"
genkeypair ec java-ec -keyalg EC -groupname secp256r1 -sigalg SHA256withECDSA "${prov[@]}"

if run keytool-list keytool -list "${ks[@]}"; then
    for a in "${aliases[@]}"; do
        if grep -q "^$a, .*PrivateKeyEntry," "$W/keytool-list.log"; then
            pass "java-keytool-list-$a-private-key-entry"
        else
            fail "java-keytool-list-$a-private-key-entry" "$(grep -E '^[a-z]' "$W/keytool-list.log" | tr '\n' ' ')"
        fi
    done
else
    fail java-keytool-list-entries "$(lastlog keytool-list)"
fi

# The objects keytool left in the token, as pkcs11-tool sees them in a new session (token
# objects only): the certificate labelled with the alias and a private key with its CKA_ID.
run objects pkcs11-tool --module "$E2E_MODULE" --token-label "$E2E_TOKEN" --login --pin "$E2E_PIN" --list-objects
for a in "${aliases[@]}"; do
    cert="$(awk -v a="$a" '
        /^[A-Za-z].* Object/ { type = $1 }
        /^ *label: / { label = $2 }
        /^ *ID: / && type == "Certificate" && label == a { print $2 }' "$W/objects.log")"
    if [ -n "$cert" ] && awk -v id="$cert" '
        /^[A-Za-z].* Object/ { type = $1 }
        /^ *ID: / && type == "Private" && $2 == id { found = 1 }
        END { exit !found }' "$W/objects.log"; then
        pass "java-token-objects-$a-share-cka-id"
    else
        fail "java-token-objects-$a-share-cka-id" "no token private key with the CKA_ID '${cert:-none}' of the certificate labelled $a"
    fi
done

# --- signatures and AES through SunPKCS11 (Java program) ----------------------------------
mkdir -p "$W/classes"
if ! run javac javac -d "$W/classes" "$src"; then
    fail java-compile "javac failed: $(lastlog javac)"
    exit 0
fi
mode=""
[ "${E2E_IS_DIRECT:-0}" = 1 ] || mode=policy
run java-program java -cp "$W/classes" Pkcs11E2E "$W/pkcs11.cfg" "$E2E_PIN" java-rsa java-ec $mode
rc=$?
grep -E '^(PASS|FAIL|SKIP) ' "$W/java-program.log"
if [ "$rc" -ne 0 ] && ! grep -q '^FAIL ' "$W/java-program.log"; then
    fail java-program "java exited with status $rc: $(lastlog java-program 3)"
fi
if [ "$mode" != policy ]; then
    skip java-policy-session-key-value-unreadable "checks cmkp11's policy; the module under test is SoftHSM2 itself (--direct)"
fi

# --- policy: a private key made in software cannot be imported into the token -------------
# import_refused NAME ALIAS LOGNAME CMD...: CMD (a keytool import) must not leave ALIAS as a
# PrivateKeyEntry in the token; keytool must report the failure.
import_refused() {
    local name="$1" alias="$2" log="$3"
    shift 3
    run "$log" "$@"
    local rc=$?
    if ! run "list-$log" keytool -list "${ks[@]}"; then
        fail "$name" "keytool -list failed afterwards: $(lastlog "list-$log")"
    elif grep -q "^$alias, .*PrivateKeyEntry" "$W/list-$log.log"; then
        fail "$name" "the software private key is in the token"
    elif [ "$rc" -eq 0 ] && ! grep -q '0 entries successfully imported' "$W/$log.log"; then
        fail "$name" "keytool reported success: $(lastlog "$log")"
    else
        pass "$name"
        note "$name: $(grep -iE 'error|exception|problem' "$W/$log.log" | head -n 1 | cut -c1-200)"
    fi
}
if policy_check java-policy-keytool-genkeypair-software-rsa-refused; then
    import_refused java-policy-keytool-genkeypair-software-rsa-refused java-sw-rsa genkeypair-sw \
        keytool -genkeypair -alias java-sw-rsa -dname "CN=software rsa" -validity 2 -keyalg RSA \
        -keysize 2048 -sigalg SHA256withRSA "${ks[@]}"
fi
if policy_check java-policy-keytool-importkeystore-refused; then
    # A PKCS#12 file with a key made in software (openssl) and its self-signed certificate.
    if ! run sw-key openssl req -x509 -newkey rsa:2048 -nodes -keyout "$W/sw.key" -subj "/CN=software key" \
        -days 2 -out "$W/sw.crt" ||
        ! run sw-p12 openssl pkcs12 -export -inkey "$W/sw.key" -in "$W/sw.crt" -name java-imported \
            -passout pass:software -out "$W/sw.p12"; then
        fail java-policy-keytool-importkeystore-refused "could not make the PKCS#12 file: $(lastlog sw-key) $(lastlog sw-p12)"
    else
        import_refused java-policy-keytool-importkeystore-refused java-imported importkeystore \
            keytool -importkeystore -noprompt -srckeystore "$W/sw.p12" -srcstoretype PKCS12 \
            -srcstorepass software -destkeystore NONE -deststoretype PKCS11 -addprovider SunPKCS11 \
            -providerArg "$W/pkcs11.cfg" -deststorepass "$E2E_PIN"
    fi
fi
exit 0
