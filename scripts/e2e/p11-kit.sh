#!/usr/bin/env bash
# Client family: p11-kit. Run by run.sh.
#  - the p11-kit module file shipped as scripts/cmkp11.module, installed in a user's
#    configuration: `p11-kit list-modules`
#    shows cmkp11 and its token, and pkcs11-tool signs through p11-kit-proxy.so. p11-kit
#    ignores user configuration for root, so this part runs as the user `nobody` with
#    HOME in the scratch directory;
#  - `p11-kit server --provider <module>` and p11-kit-client.so (the network-HSM shape):
#    a signature through the client.
# Signatures are verified by openssl in software.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
libdir=/usr/lib/x86_64-linux-gnu
for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
    [ -f "$d/p11-kit-proxy.so" ] && libdir="$d" && break
done
proxy="$libdir/p11-kit-proxy.so"
client="$libdir/pkcs11/p11-kit-client.so"
if ! have p11-kit || [ ! -f "$proxy" ] || [ ! -f "$client" ] || ! have pkcs11-tool || ! have runuser; then
    skip p11-kit "p11-kit, p11-kit-proxy.so, p11-kit-client.so, pkcs11-tool or runuser missing (scripts/setup.sh installs p11-kit, p11-kit-modules, opensc)"
    exit 0
fi
user=nobody
if [ "$(id -u)" -ne 0 ]; then
    user=""
fi

# The user configuration: cmkp11's module file, and SoftHSM2's system module file (which
# the softhsm2 package installs) disabled for pkcs11-tool so that the proxy exposes the
# token once, through cmkp11 only.
mkdir -p "$W/home/.config/pkcs11/modules"
# The shipped module file (scripts/cmkp11.module), pointed at the module under test.
shipped="$(dirname "${BASH_SOURCE[0]}")/../cmkp11.module"
sed "s|^module:.*|module: $E2E_MODULE|" "$shipped" >"$W/home/.config/pkcs11/modules/cmkp11.module"
printf 'disable-in: pkcs11-tool\n' >"$W/home/.config/pkcs11/modules/softhsm2.module"
if [ -n "$user" ]; then
    # nobody needs to reach the token store and configs in the scratch directory.
    chmod 711 "$(dirname "$W")"
    chown -R "$user" "$W"
fi

# "${asuser[@]}" CMD...: CMD as the unprivileged user (or as is when not root), with the
# family's token and configs and HOME in the scratch directory.
asuser=(env HOME="$W/home" XDG_CONFIG_HOME="$W/home/.config" PATH="$PATH"
    SOFTHSM2_CONF="$SOFTHSM2_CONF" CMKP11_CONFIG="$CMKP11_CONFIG")
[ -n "$user" ] && asuser=(runuser -u "$user" -- "${asuser[@]}")

# --- key pair for the signatures (through the module, as the user) -----------------------
login=(--login --pin "$E2E_PIN")
key_ok=0
if run keygen "${asuser[@]}" pkcs11-tool --module "$E2E_MODULE" --token-label "$E2E_TOKEN" "${login[@]}" \
    --keypairgen --key-type EC:prime256v1 --label p11kit-ec --id 41 &&
    run read-pub "${asuser[@]}" pkcs11-tool --module "$E2E_MODULE" --token-label "$E2E_TOKEN" \
        --read-object --type pubkey --id 41 -o "$W/ec.der" &&
    run pem openssl pkey -pubin -inform DER -in "$W/ec.der" -out "$W/ec.pem"; then
    key_ok=1
else
    fail p11-kit-key "could not make and export an EC key: $(lastlog keygen) $(lastlog read-pub)"
fi
head -c 4096 /dev/urandom >"$W/data"
cp "$W/data" "$W/data.bad"
printf 'x' | dd of="$W/data.bad" bs=1 seek=7 conv=notrunc status=none
openssl dgst -sha256 -binary "$W/data" >"$W/data.sha256"
chmod 644 "$W/data" "$W/data.sha256"

# sign_verify NAME MODULE [PREFIX...]: ECDSA signature by pkcs11-tool through MODULE, checked
# by openssl on the data and refused on altered data.
sign_verify() {
    local name="$1" mod="$2"
    shift 2
    if ! run "sign-$name" "$@" pkcs11-tool --module "$mod" --token-label "$E2E_TOKEN" "${login[@]}" \
        --sign -m ECDSA --id 41 --signature-format openssl -i "$W/data.sha256" -o "$W/sig-$name"; then
        fail "$name" "signing failed: $(lastlog "sign-$name")"
    elif ! run "verify-$name" openssl dgst -sha256 -verify "$W/ec.pem" -signature "$W/sig-$name" "$W/data"; then
        fail "$name" "openssl rejected the signature: $(lastlog "verify-$name")"
    elif run "verify-bad-$name" openssl dgst -sha256 -verify "$W/ec.pem" -signature "$W/sig-$name" "$W/data.bad"; then
        fail "$name" "the signature also verified over altered data (check is broken)"
    else
        pass "$name"
    fi
}

# --- p11-kit list-modules and the proxy ---------------------------------------------------
if run list-modules "${asuser[@]}" p11-kit list-modules &&
    awk -v mod="cmkp11: $E2E_MODULE" -v tok="token: $E2E_TOKEN" '
        $0 == mod { inside = 1; next }
        /^[^ ]/ { inside = 0 }
        inside && $0 ~ ("^ +" tok "$") { found = 1 }
        END { exit !found }' "$W/list-modules.log"; then
    pass p11-kit-list-modules
else
    fail p11-kit-list-modules "cmkp11 or its token '$E2E_TOKEN' not listed: $(grep -E '^[a-z]' "$W/list-modules.log" | tr '\n' ' ')"
fi

if run proxy-slots "${asuser[@]}" pkcs11-tool --module "$proxy" --list-slots &&
    [ "$(grep -c "token label *: $E2E_TOKEN\$" "$W/proxy-slots.log")" -eq 1 ]; then
    pass p11-kit-proxy-lists-token
else
    fail p11-kit-proxy-lists-token "token '$E2E_TOKEN' not listed exactly once: $(lastlog proxy-slots 4)"
fi
[ "$key_ok" = 1 ] && sign_verify p11-kit-proxy-sign-ecdsa "$proxy" "${asuser[@]}"

# --- p11-kit server + p11-kit-client.so -----------------------------------------------------
# Runs as the invoking user (it only needs the token store). Stopped by PID.
sock="$W/p11kit.sock"
timeout -k 5 "$E2E_CMD_TIMEOUT" p11-kit server -f -n "$sock" --provider "$E2E_MODULE" \
    "pkcs11:token=$E2E_TOKEN" >"$W/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
    [ -S "$sock" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [ ! -S "$sock" ]; then
    fail p11-kit-server-client-lists-token "the server did not open its socket within 10 s: $(tail -n 2 "$W/server.log" | tr '\n' ' ')"
else
    export P11_KIT_SERVER_ADDRESS="unix:path=$sock"
    if run client-slots pkcs11-tool --module "$client" --list-slots &&
        grep -q "token label *: $E2E_TOKEN\$" "$W/client-slots.log"; then
        pass p11-kit-server-client-lists-token
    else
        fail p11-kit-server-client-lists-token "$(lastlog client-slots 3)"
    fi
    [ "$key_ok" = 1 ] && sign_verify p11-kit-server-client-sign-ecdsa "$client"
    unset P11_KIT_SERVER_ADDRESS
fi
kill "$server_pid" 2>/dev/null
wait "$server_pid" 2>/dev/null
spid="$(sed -n 's/^P11_KIT_SERVER_PID=\([0-9]*\);.*/\1/p' "$W/server.log")"
if [ -n "$spid" ] && [ "$(ps -o comm= -p "$spid" 2>/dev/null)" = p11-kit ]; then
    kill "$spid"
fi
exit 0
