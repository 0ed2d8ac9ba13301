#!/usr/bin/env bash
# Client family: NSS (modutil, certutil) with the module under test added to a private
# NSS database. Run by run.sh. The certificate made in the token is checked by openssl.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
if ! have modutil || ! have certutil || ! have openssl; then
    skip nss "modutil/certutil or openssl missing (scripts/setup.sh installs libnss3-tools, openssl)"
    exit 0
fi
db="sql:$W/nssdb"
mkdir -p "$W/nssdb"
printf '%s\n' "$E2E_PIN" >"$W/pin.txt"
chmod 600 "$W/pin.txt"
head -c 64 /dev/urandom >"$W/noise"

if ! run certutil-N certutil -N -d "$db" --empty-password; then
    fail nss-create-db "$(lastlog certutil-N)"
    exit 0
fi

# NSS asks before changing a database when a browser might be running; -force skips that.
if run modutil-add modutil -force -dbdir "$db" -add cmkp11 -libfile "$E2E_MODULE" &&
    run modutil-list modutil -dbdir "$db" -list cmkp11 &&
    grep -q "Token Name: $E2E_TOKEN" "$W/modutil-list.log"; then
    pass nss-modutil-add
else
    fail nss-modutil-add "module added but token not listed, or add failed: $(lastlog modutil-add) $(lastlog modutil-list)"
    exit 0
fi

if run certutil-U certutil -U -d "$db" && grep -q "token: $E2E_TOKEN" "$W/certutil-U.log"; then
    pass nss-certutil-U
else
    fail nss-certutil-U "token '$E2E_TOKEN' not listed: $(lastlog certutil-U)"
fi

for kind in rsa ec; do
    name="nss-certutil-S-$kind"
    if [ "$kind" = rsa ]; then keyopts=(-k rsa -g 2048); else keyopts=(-k ec -q nistp256); fi
    if run "certutil-S-$kind" certutil -S -d "$db" -h "$E2E_TOKEN" -f "$W/pin.txt" \
        -z "$W/noise" -n "nss-$kind" -s "CN=cmkp11 e2e nss $kind" -x -t "CT,," -v 1 \
        "${keyopts[@]}" &&
        run "export-$kind" certutil -L -d "$db" -h "$E2E_TOKEN" -f "$W/pin.txt" \
            -n "$E2E_TOKEN:nss-$kind" -a -o "$W/$kind.crt" &&
        run "verify-$kind" openssl verify -CAfile "$W/$kind.crt" "$W/$kind.crt"; then
        pass "$name"
    else
        fail "$name" "$(lastlog "certutil-S-$kind") $(lastlog "export-$kind") $(lastlog "verify-$kind")"
    fi
done

if run certutil-L certutil -L -d "$db" -h all -f "$W/pin.txt" &&
    grep -q "$E2E_TOKEN:nss-rsa" "$W/certutil-L.log" &&
    grep -q "$E2E_TOKEN:nss-ec" "$W/certutil-L.log"; then
    pass nss-certutil-L-all
else
    fail nss-certutil-L-all "token certificates not listed: $(lastlog certutil-L 4)"
fi

if run certutil-K certutil -K -d "$db" -h "$E2E_TOKEN" -f "$W/pin.txt" &&
    grep -q "nss-rsa" "$W/certutil-K.log" && grep -q "nss-ec" "$W/certutil-K.log"; then
    pass nss-certutil-K-token
else
    fail nss-certutil-K-token "token keys not listed: $(lastlog certutil-K 4)"
fi
exit 0
