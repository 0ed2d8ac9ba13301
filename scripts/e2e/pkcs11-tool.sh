#!/usr/bin/env bash
# Client family: OpenSC's pkcs11-tool through the module under test. Run by run.sh.
# Every signature is verified by openssl in software against the public key read back
# from the token; --test and --test-threads are compared with SoftHSM2 directly.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if ! have pkcs11-tool || ! have openssl; then
    skip pkcs11-tool "pkcs11-tool or openssl not installed (scripts/setup.sh installs opensc, openssl)"
    exit 0
fi

W="$E2E_WORK"
# pkcs11-tool on the family token through the module under test / SoftHSM2 directly.
p11=(pkcs11-tool --module "$E2E_MODULE" --token-label "$E2E_TOKEN")
p11d=(pkcs11-tool --module "$E2E_DIRECT_MODULE" --token-label "$E2E_TOKEN")
login=(--login --pin "$E2E_PIN")

# --- slots and mechanisms ------------------------------------------------------------
if run list-slots "${p11[@]}" --list-slots &&
    grep -Eq "token label +: $E2E_TOKEN\$" "$W/list-slots.log"; then
    pass list-slots
else
    fail list-slots "token '$E2E_TOKEN' not listed: $(lastlog list-slots)"
fi

if run mechanisms "${p11[@]}" -M; then
    missing=""
    for m in AES-KEY-GEN AES-GCM AES-KEY-WRAP SHA256-RSA-PKCS RSA-PKCS-PSS ECDSA \
        RSA-PKCS-KEY-PAIR-GEN ECDSA-KEY-PAIR-GEN; do
        grep -Eq "^ +${m}[ ,]" "$W/mechanisms.log" || missing="$missing $m"
    done
    if [ -z "$missing" ]; then
        pass list-mechanisms
    else
        fail list-mechanisms "missing:$missing"
    fi
else
    fail list-mechanisms "$(lastlog mechanisms)"
fi

# --- login ---------------------------------------------------------------------------
if run login-good "${p11[@]}" "${login[@]}" --list-objects; then
    pass login-good-pin
else
    fail login-good-pin "$(lastlog login-good)"
fi

if run login-bad "${p11[@]}" --login --pin 99999999 --list-objects; then
    fail login-bad-pin-refused "a wrong PIN was accepted"
elif grep -q CKR_PIN_INCORRECT "$W/login-bad.log"; then
    pass login-bad-pin-refused
else
    fail login-bad-pin-refused "refused but not with CKR_PIN_INCORRECT: $(lastlog login-bad)"
fi

# --- key generation ------------------------------------------------------------------
# pkcs11-tool keeps every key it makes as a token object, i.e. a CMK: it must be sensitive.
# --sensitive with no usage flag gives ENCRYPT+DECRYPT: a data CMK.
aes_ok=0
if run keygen-aes "${p11[@]}" "${login[@]}" --keygen --key-type AES:32 --sensitive \
    --label e2e-aes --id 10 && grep -q "AES length 32" "$W/keygen-aes.log"; then
    pass keygen-aes-256-data-cmk
    aes_ok=1
else
    fail keygen-aes-256-data-cmk "$(lastlog keygen-aes)"
fi
wrap_ok=0
if run keygen-aes-wrap "${p11[@]}" "${login[@]}" --keygen --key-type AES:32 --sensitive \
    --usage-wrap --label e2e-wrap --id 13 && grep -q "Usage:.*wrap, unwrap$" "$W/keygen-aes-wrap.log"; then
    pass keygen-aes-256-wrap-cmk
    wrap_ok=1
    # A wrap CMK has the wrap role only (SoftHSM2 alone adds encrypt, decrypt, verify).
    if policy_check policy-wrap-cmk-has-wrap-role-only; then
        if grep -Eq "Usage: +wrap, unwrap$" "$W/keygen-aes-wrap.log"; then
            pass policy-wrap-cmk-has-wrap-role-only
        else
            fail policy-wrap-cmk-has-wrap-role-only "$(grep 'Usage:' "$W/keygen-aes-wrap.log" | head -1)"
        fi
    fi
else
    fail keygen-aes-256-wrap-cmk "$(lastlog keygen-aes-wrap)"
fi
# pkcs11-tool's default AES template asks CKA_SENSITIVE=FALSE for a token key: refused.
if policy_check policy-keygen-aes-not-sensitive-refused; then
    if run keygen-aes-plain "${p11[@]}" "${login[@]}" --keygen --key-type AES:32 --label e2e-plain; then
        fail policy-keygen-aes-not-sensitive-refused "a non-sensitive token AES key was generated"
    elif grep -q CKR_TEMPLATE_INCONSISTENT "$W/keygen-aes-plain.log"; then
        pass policy-keygen-aes-not-sensitive-refused
    else
        fail policy-keygen-aes-not-sensitive-refused "refused, but not with CKR_TEMPLATE_INCONSISTENT: $(lastlog keygen-aes-plain)"
    fi
fi

rsa_ok=0 ec_ok=0
if run keygen-rsa "${p11[@]}" "${login[@]}" --keypairgen --key-type rsa:2048 --label e2e-rsa --id 11 &&
    grep -q "RSA 2048 bits" "$W/keygen-rsa.log"; then
    pass keypairgen-rsa-2048
    rsa_ok=1
else
    fail keypairgen-rsa-2048 "$(lastlog keygen-rsa)"
fi

if run keygen-ec "${p11[@]}" "${login[@]}" --keypairgen --key-type EC:prime256v1 --label e2e-ec --id 12 &&
    grep -q "EC_POINT 256 bits" "$W/keygen-ec.log"; then
    pass keypairgen-ec-p256
    ec_ok=1
else
    fail keypairgen-ec-p256 "$(lastlog keygen-ec)"
fi

# --- public keys, read back and converted for openssl ----------------------------------
# export_pub NAME ID: $W/NAME.pem from the token's public key object with CKA_ID ID.
export_pub() {
    run "read-$1" "${p11[@]}" --read-object --type pubkey --id "$2" -o "$W/$1.der" &&
        run "pem-$1" openssl pkey -pubin -inform DER -in "$W/$1.der" -out "$W/$1.pem"
}
if [ "$rsa_ok" = 1 ]; then
    if export_pub rsa 11 && grep -q "Public-Key: (2048 bit)" <(openssl pkey -pubin -in "$W/rsa.pem" -text -noout 2>&1); then
        pass read-pubkey-rsa
    else
        fail read-pubkey-rsa "$(lastlog read-rsa) $(lastlog pem-rsa)"
        rsa_ok=0
    fi
fi
# ec_point_pem NAME ID: $W/NAME.pem built from the CKA_EC_POINT (a DER OCTET STRING of an
# uncompressed P-256 point) that pkcs11-tool lists for the public key with CKA_ID ID.
ec_point_pem() {
    local hex
    run "list-$1" "${p11[@]}" --list-objects --type pubkey --id "$2" || return 1
    hex="$(sed -nE 's/^ +EC_POINT: +0441(04[0-9a-f]{128})$/\1/p' "$W/list-$1.log" | head -n 1)"
    [ -n "$hex" ] || return 1
    "$CMK_PYTHON" -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1]))' \
        "3059301306072a8648ce3d020106082a8648ce3d030107034200$hex" >"$W/$1.der" &&
        run "pem-$1" openssl pkey -pubin -inform DER -in "$W/$1.der" -out "$W/$1.pem"
}
if [ "$ec_ok" = 1 ]; then
    if export_pub ec 12 && grep -q "prime256v1" <(openssl pkey -pubin -in "$W/ec.pem" -text -noout 2>&1); then
        pass read-pubkey-ec
    elif ! run read-direct-ec "${p11d[@]}" --read-object --type pubkey --id 12 -o "$W/ec-direct.der" &&
        ec_point_pem ec 12 && grep -q "prime256v1" <(openssl pkey -pubin -in "$W/ec.pem" -text -noout 2>&1); then
        # kryoptic 1.0: pkcs11-tool cannot export its EC public keys, directly neither.
        pass read-pubkey-ec
        note "read-pubkey-ec: pkcs11-tool cannot export this token's EC public key (directly neither: $(lastlog read-direct-ec 2)); built from CKA_EC_POINT as listed through the module"
    else
        fail read-pubkey-ec "$(lastlog read-ec) $(lastlog pem-ec)"
        ec_ok=0
    fi
fi

# --- signatures, verified by openssl in software ---------------------------------------
head -c 4096 /dev/urandom >"$W/data"
cp "$W/data" "$W/data.bad"
printf 'x' | dd of="$W/data.bad" bs=1 seek=100 conv=notrunc status=none
openssl dgst -sha256 -binary "$W/data" >"$W/data.sha256"
openssl dgst -sha256 -binary "$W/data.bad" >"$W/data.bad.sha256"

# verify NAME GOOD_CMD... : the check passes when openssl accepts the signature on the
# real data and rejects it on data with one changed byte (VERIFY_BAD holds that command).
verify() {
    local name="$1"
    shift
    if ! run "verify-$name" "$@"; then
        fail "$name" "openssl rejected the token's signature: $(lastlog "verify-$name")"
    elif run "verify-bad-$name" "${VERIFY_BAD[@]}"; then
        fail "$name" "openssl also accepted the signature on altered data (check is broken)"
    else
        pass "$name"
    fi
}

if [ "$rsa_ok" = 1 ]; then
    if run sign-rsa-pkcs "${p11[@]}" "${login[@]}" --sign --id 11 -m SHA256-RSA-PKCS \
        -i "$W/data" -o "$W/sig-rsa-pkcs"; then
        VERIFY_BAD=(openssl dgst -sha256 -verify "$W/rsa.pem" -signature "$W/sig-rsa-pkcs" "$W/data.bad")
        verify sign-sha256-rsa-pkcs openssl dgst -sha256 -verify "$W/rsa.pem" \
            -signature "$W/sig-rsa-pkcs" "$W/data"
    else
        fail sign-sha256-rsa-pkcs "$(lastlog sign-rsa-pkcs)"
    fi

    if run sign-rsa-pss "${p11[@]}" "${login[@]}" --sign --id 11 -m RSA-PKCS-PSS \
        --hash-algorithm SHA256 --mgf MGF1-SHA256 -i "$W/data.sha256" -o "$W/sig-rsa-pss"; then
        pss=(-pkeyopt rsa_padding_mode:pss -pkeyopt digest:sha256 -pkeyopt rsa_mgf1_md:sha256
            -pkeyopt rsa_pss_saltlen:32)
        VERIFY_BAD=(openssl pkeyutl -verify -pubin -inkey "$W/rsa.pem" -in "$W/data.bad.sha256"
            -sigfile "$W/sig-rsa-pss" "${pss[@]}")
        verify sign-rsa-pkcs-pss-sha256 openssl pkeyutl -verify -pubin -inkey "$W/rsa.pem" \
            -in "$W/data.sha256" -sigfile "$W/sig-rsa-pss" "${pss[@]}"
    else
        fail sign-rsa-pkcs-pss-sha256 "$(lastlog sign-rsa-pss)"
    fi
else
    fail sign-sha256-rsa-pkcs "no RSA key pair (key generation or export failed)"
    fail sign-rsa-pkcs-pss-sha256 "no RSA key pair (key generation or export failed)"
fi

if [ "$ec_ok" = 1 ]; then
    if run sign-ecdsa "${p11[@]}" "${login[@]}" --sign --id 12 -m ECDSA --signature-format openssl \
        -i "$W/data.sha256" -o "$W/sig-ecdsa"; then
        VERIFY_BAD=(openssl dgst -sha256 -verify "$W/ec.pem" -signature "$W/sig-ecdsa" "$W/data.bad")
        verify sign-ecdsa-p256 openssl dgst -sha256 -verify "$W/ec.pem" \
            -signature "$W/sig-ecdsa" "$W/data"
    else
        fail sign-ecdsa-p256 "$(lastlog sign-ecdsa)"
    fi
else
    fail sign-ecdsa-p256 "no EC key pair (key generation or export failed)"
fi

# --- encryption with the data CMK; wrapping a token key is refused ------------------------
if [ "$aes_ok" = 1 ]; then
    iv=000102030405060708090a0b0c0d0e0f
    head -c 100 /dev/urandom >"$W/pt"
    if ! run aes-enc "${p11[@]}" "${login[@]}" --encrypt -m AES-CBC-PAD --iv "$iv" --id 10 \
        -i "$W/pt" -o "$W/ct"; then
        fail encrypt-decrypt-aes-cbc-pad "encrypt: $(lastlog aes-enc)"
    elif [ "$(stat -c %s "$W/ct")" -ne 112 ] || cmp -s <(head -c 100 "$W/ct") "$W/pt"; then
        fail encrypt-decrypt-aes-cbc-pad "ciphertext is not 112 bytes of ciphertext for 100 bytes of data"
    elif ! run aes-dec "${p11[@]}" "${login[@]}" --decrypt -m AES-CBC-PAD --iv "$iv" --id 10 \
        -i "$W/ct" -o "$W/pt2"; then
        fail encrypt-decrypt-aes-cbc-pad "decrypt: $(lastlog aes-dec)"
    elif ! cmp -s "$W/pt" "$W/pt2"; then
        fail encrypt-decrypt-aes-cbc-pad "decrypted bytes differ from the plaintext"
    else
        pass encrypt-decrypt-aes-cbc-pad
    fi
fi
if [ "$aes_ok" = 1 ] && [ "$wrap_ok" = 1 ]; then
    if run wrap-cmk "${p11[@]}" "${login[@]}" --wrap -m AES-KEY-WRAP --id 13 --application-id 10 \
        -o "$W/blob"; then
        fail wrap-token-key-refused "a token key (CMK) was wrapped"
    elif grep -Eq 'CKR_KEY_UNEXTRACTABLE|CKR_KEY_NOT_WRAPPABLE|CKR_KEY_FUNCTION_NOT_PERMITTED' "$W/wrap-cmk.log"; then
        pass wrap-token-key-refused
        note "wrap-token-key-refused: $(grep -Eo 'CKR_[A-Z_]+' "$W/wrap-cmk.log" | head -1)"
    else
        fail wrap-token-key-refused "refused without a key-related reason: $(lastlog wrap-cmk)"
    fi
fi

# --- pkcs11-tool --test, compared with SoftHSM2 directly on the same token ---------------
# Both runs see the same objects. Through the module the run must be at least as good:
# the same exit status (or 0), no error line that the direct run does not have, and every
# section the direct run reaches. Lines only the direct run has (mechanisms the module
# does not list, e.g. those the policy removes) are shown as a note.
normalize() { grep -v '^\$ ' "$1" | sed -E 's/0x[0-9a-f]{6,}/0xID/g' | sort -u; }
run test-cmk "${p11[@]}" "${login[@]}" --test
rc_cmk=$?
run test-direct "${p11d[@]}" "${login[@]}" --test
rc_direct=$?
normalize "$W/test-cmk.log" >"$W/test-cmk.norm"
normalize "$W/test-direct.log" >"$W/test-direct.norm"
only_cmk="$(comm -13 "$W/test-direct.norm" "$W/test-cmk.norm")"
only_direct="$(comm -23 "$W/test-direct.norm" "$W/test-cmk.norm")"
new_errors="$(grep -Ei 'error|fail|abort|invalid|CKR_|ERR' <<<"$only_cmk" | tr '\n' ';')"
lost_sections="$(grep -E '^[A-Za-z]' <<<"$only_direct" | grep -Evi 'error|abort' | tr '\n' ';')"
if [ "$rc_cmk" -eq 124 ]; then
    fail test "pkcs11-tool --test timed out through the module"
elif [ "$rc_cmk" -ne 0 ] && [ "$rc_cmk" -ne "$rc_direct" ]; then
    fail test "exit status $rc_cmk through the module, $rc_direct directly: $(lastlog test-cmk 2)"
elif [ -n "$new_errors" ] || [ -n "$lost_sections" ]; then
    fail test "through the module only: ${new_errors:-none}; sections reached only directly: ${lost_sections:-none}"
else
    pass test
fi
[ -z "$only_direct" ] ||
    note "test: lines only in the direct run: $(grep -v '^ -- mechanism' <<<"$only_direct" | sed 's/^ *//' | tr '\n' ';')"
[ -z "$only_cmk" ] ||
    note "test: lines only through the module: $(sed 's/^ *//' <<<"$only_cmk" | tr '\n' ';')"

# --- pkcs11-tool --test-threads -------------------------------------------------------
# Two threads each C_Initialize (CKF_OS_LOCKING_OK), C_GetInfo, C_GetSlotList,
# C_GetTokenInfo while the main thread lists the slots. opensc 0.23 races here against
# SoftHSM2 directly (crashes and hangs in a fraction of runs); the module must survive
# every round.
if grep -q -- --test-threads <(pkcs11-tool --help 2>&1); then
    # pkcs11-tool sleeps 30 s at the end of every round, so the rounds run side by side.
    rounds="${E2E_THREAD_ROUNDS:-3}"
    for i in $(seq "$rounds"); do
        E2E_CMD_TIMEOUT=60 run "threads-cmk-$i" pkcs11-tool --module "$E2E_MODULE" \
            --test-threads ILGISLT0 --test-threads ILGISLT0 -L &
        echo $! >"$W/threads-cmk-$i.pid"
        E2E_CMD_TIMEOUT=60 run "threads-direct-$i" pkcs11-tool --module "$E2E_DIRECT_MODULE" \
            --test-threads ILGISLT0 --test-threads ILGISLT0 -L &
        echo $! >"$W/threads-direct-$i.pid"
    done
    ok_cmk=0 ok_direct=0 why=""
    for i in $(seq "$rounds"); do
        if wait "$(cat "$W/threads-cmk-$i.pid")" &&
            grep -q "token label *: $E2E_TOKEN" "$W/threads-cmk-$i.log"; then
            ok_cmk=$((ok_cmk + 1))
        else
            [ -n "$why" ] || why="round $i: $(lastlog "threads-cmk-$i" 2)"
        fi
        if wait "$(cat "$W/threads-direct-$i.pid")"; then
            ok_direct=$((ok_direct + 1))
        fi
    done
    if [ "$ok_cmk" -eq "$rounds" ]; then
        pass test-threads
    else
        fail test-threads "$ok_cmk/$rounds rounds clean through the module (SoftHSM2 direct $ok_direct/$rounds); first failure $why"
    fi
    note "test-threads: $ok_cmk/$rounds rounds clean through the module, $ok_direct/$rounds directly"
else
    skip test-threads "this pkcs11-tool has no --test-threads"
fi

exit 0
