#!/usr/bin/env bash
# Client family: Apache httpd (mod_ssl) serving TLS with token keys. Run by run.sh.
#
# How httpd reaches the token: Debian 12's apache2 2.4 is built against OpenSSL 3 with
# ENGINE support; `SSLCryptoDevice pkcs11` loads libp11's engine (configured through the
# openssl.cnf named by OPENSSL_CONF, MODULE_PATH = the module under test) and
# `SSLCertificateKeyFile` takes a PKCS#11 URI, which mod_ssl hands to the engine.
# The keys and their certificates are made the way docs/clients/apache.md tells an
# operator: `cmkp11 key create --type rsa-2048|ec-p256`, `cmkp11 key csr` with the SANs,
# the request signed by a CA (here a throwaway one in the scratch directory).
# httpd's children run as www-data and re-initialise the module after fork: they need what
# the module needs (grant_module_access in common.sh: in library mode, the token store and
# cmkp11's configuration).
#
# Checks: the CSRs verify; `apache2 -t`; httpd with two children on 127.0.0.1 ports of
# E2E_PORTS; curl fetches the page over TLS 1.2 and 1.3 with each key, verifying the chain
# and name; a graceful restart (apache2 -k graceful) replaces the children and the page is
# still served with both keys; no [emerg]/[alert]/[crit] in the error log.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
HTTPD=/usr/sbin/apache2
MODS=/usr/lib/apache2/modules
if [ ! -x "$HTTPD" ] || [ ! -f "$MODS/mod_ssl.so" ] || ! have curl || [ ! -f "$(engine_path)" ] ||
    [ ! -x "$E2E_CLI" ]; then
    skip apache "apache2, curl, libp11's engine or $E2E_CLI missing (scripts/setup.sh installs apache2, curl, libengine-pkcs11-openssl; cargo build --release)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    skip apache "httpd's children switch to www-data: run the suite as root"
    exit 0
fi

hpid=""
# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
    [ -n "$hpid" ] && stop_pid "$hpid"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# --- keys, requests and certificates with the cmkp11 command ------------------------------
make_ca "$W" || { fail apache-ca "openssl could not make the test CA"; exit 0; }
keys=()
for k in rsa:rsa-2048:61 ec:ec-p256:62; do
    IFS=: read -r name type id <<<"$k"
    if run_cli "create-$name" key create "apache-$name" --type "$type" --id "$id" &&
        run_cli "csr-$name" key csr "apache-$name" --subject "/O=cmkp11 e2e/CN=localhost" \
            --san DNS:localhost --san IP:127.0.0.1 --out "$W/$name.csr" &&
        run "csr-verify-$name" openssl req -in "$W/$name.csr" -verify -noout &&
        ca_sign "$W" "$W/$name.csr" "$W/$name.crt" >"$W/sign-$name.log" 2>&1; then
        keys+=("$name")
        pass "apache-cli-key-csr-$name"
    else
        fail "apache-cli-key-csr-$name" "$(lastlog "create-$name") $(lastlog "csr-$name") $(lastlog "csr-verify-$name") $(lastlog "sign-$name")"
    fi
done
[ "${#keys[@]}" -gt 0 ] || exit 0

# --- httpd ----------------------------------------------------------------------------------
engine_cnf "$W/openssl.cnf" "$E2E_MODULE"
read -r p_rsa p_ec <<<"$(free_ports 2)"
declare -A port=([rsa]=$p_rsa [ec]=$p_ec)
d="$W/httpd"
mkdir -p "$d/html"
echo "hello from cmkp11 e2e apache $$" >"$d/html/index.html"
uri() { printf 'pkcs11:token=%s;object=apache-%s;type=private;pin-value=%s' "$E2E_TOKEN" "$1" "$E2E_PIN"; }
{
    cat <<EOF
ServerRoot "$d"
ServerName localhost
PidFile $d/httpd.pid
ErrorLog $d/error.log
LogLevel warn
LoadModule mpm_event_module $MODS/mod_mpm_event.so
LoadModule authz_core_module $MODS/mod_authz_core.so
LoadModule ssl_module $MODS/mod_ssl.so
User www-data
Group www-data
StartServers 2
MinSpareThreads 2
MaxSpareThreads 50
ThreadsPerChild 25
DocumentRoot "$d/html"
<Directory "$d/html">
    Require all granted
</Directory>
SSLCryptoDevice pkcs11
SSLProtocol -all +TLSv1.2 +TLSv1.3
SSLSessionCache none
SSLSessionTickets off
EOF
    for k in "${keys[@]}"; do
        cat <<EOF
Listen 127.0.0.1:${port[$k]}
<VirtualHost 127.0.0.1:${port[$k]}>
    SSLEngine on
    SSLCertificateFile $W/$k.crt
    SSLCertificateKeyFile "$(uri "$k")"
</VirtualHost>
EOF
    done
} >"$d/httpd.conf"

# The children (www-data) open the token after fork.
grant_module_access www-data
chmod 755 "$d" "$d/html"
chmod 644 "$d/html/index.html"

httpd_env=(env OPENSSL_CONF="$W/openssl.cnf")
if ! run apache-t "${httpd_env[@]}" "$HTTPD" -t -f "$d/httpd.conf"; then
    fail apache-config "apache2 -t refused the configuration: $(lastlog apache-t)"
    exit 0
fi
"${httpd_env[@]}" "$HTTPD" -f "$d/httpd.conf" -DFOREGROUND >"$d/stdout.log" 2>&1 &
hpid=$!
# children PID: the PIDs of the parent's children, sorted.
children() { ps -o pid= --ppid "$hpid" 2>/dev/null | tr -d ' ' | sort | tr '\n' ' '; }
started=0
for _ in $(seq 200); do
    kill -0 "$hpid" 2>/dev/null || break
    if [ -s "$d/httpd.pid" ] && [ "$(wc -w <<<"$(children)")" -ge 2 ] && wait_port "${port[${keys[0]}]}" 1; then
        started=1
        break
    fi
    sleep 0.1
done
if [ "$started" = 0 ]; then
    fail apache-start "httpd did not start with 2 children: $(tail -n 3 "$d/error.log" "$d/stdout.log" 2>/dev/null | tr '\n' ' ')"
    exit 0
fi
before="$(children)"
pass apache-start
note "httpd parent $hpid, children $before(user www-data)"

# uses_module PID...: every PID has the module under test mapped (libp11 loaded it, not
# another module reached through p11-kit's proxy, libp11's default without MODULE_PATH).
uses_module() {
    local p real
    real="$(readlink -f "$E2E_MODULE")"
    for p in "$@"; do
        grep -qF "$real" "/proc/$p/maps" 2>/dev/null || return 1
    done
}

# fetch NAME PORT TLSVER: curl over exactly TLS TLSVER, chain and name verified.
fetch() {
    local name="$1" p="$2" v="$3"
    if ! run "$name" curl -sS -v --max-time 20 --tlsv"$v" --tls-max "$v" --cacert "$W/ca.crt" \
        -o "$W/body-$name" "https://localhost:$p/index.html" --resolve "localhost:$p:127.0.0.1"; then
        fail "$name" "curl failed: $(grep -E '^(curl|\* )' "$W/$name.log" | tail -n 2 | tr '\n' ' ') / $(tail -n 2 "$d/error.log" | tr '\n' ' ')"
    elif ! cmp -s "$W/body-$name" "$d/html/index.html"; then
        fail "$name" "the page served differs from the one written"
    elif ! grep -q "SSL connection using TLSv$v " "$W/$name.log"; then
        fail "$name" "curl did not report TLSv$v: $(grep 'SSL connection' "$W/$name.log")"
    else
        pass "$name"
    fi
}
fetch_all() {
    local k v
    for k in "${keys[@]}"; do
        for v in 1.2 1.3; do
            fetch "apache-tls${v/./}-$k$1" "${port[$k]}" "$v"
        done
    done
}
fetch_all ""
# shellcheck disable=SC2086 # a list of PIDs
if uses_module $before; then
    pass apache-children-load-module
else
    fail apache-children-load-module "a child does not map $E2E_MODULE"
fi

# --- graceful restart -----------------------------------------------------------------------
if run graceful "${httpd_env[@]}" "$HTTPD" -k graceful -f "$d/httpd.conf"; then
    replaced=0
    for _ in $(seq 200); do
        now="$(children)"
        left=0
        for c in $before; do
            grep -qw "$c" <<<"$now" && left=1
        done
        if [ "$left" = 0 ] && [ "$(wc -w <<<"$now")" -ge 2 ]; then
            replaced=1
            break
        fi
        sleep 0.1
    done
    if [ "$replaced" = 1 ] && kill -0 "$hpid" 2>/dev/null; then
        pass apache-graceful-restart
        note "after apache2 -k graceful: parent $hpid, children $now"
        fetch_all -after-graceful
        # shellcheck disable=SC2086 # a list of PIDs
        uses_module $now || fail apache-children-load-module-after-graceful "a new child does not map $E2E_MODULE"
    else
        fail apache-graceful-restart "children not replaced within 20 s (before: $before, now: ${now:-none}): $(tail -n 2 "$d/error.log" | tr '\n' ' ')"
    fi
else
    fail apache-graceful-restart "$(lastlog graceful)"
fi
if grep -qE ':(emerg|alert|crit)\]' "$d/error.log"; then
    fail apache-error-log "$(grep -E ':(emerg|alert|crit)\]' "$d/error.log" | head -n 2 | tr '\n' ' ')"
else
    pass apache-error-log
fi
exit 0
