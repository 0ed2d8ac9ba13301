#!/usr/bin/env bash
# TLS handshakes per second through nginx and Apache httpd with a token EC P-256 key:
# cmkp11 against SoftHSM2 directly, in the same run. Not part of CI (a measurement).
#
#   bash scripts/bench-tls.sh [--module PATH] [--handshakes N] [--rounds R] [--threads T]
#
#   --module PATH    cmkp11 module (default: target/release/libcmkp11.so)
#   --handshakes N   full TLS 1.3 handshakes per server and module (default 2000)
#   --rounds R       paired rounds (default 20): each round makes N/R handshakes against the
#                    cmkp11 server and the direct one, in ABBA order (scripts/e2e/tls_burst.py)
#   --threads T      client threads (default 2)
#
# One private SoftHSM2 token in a temp dir; the key is made with `cmkp11 key create --type
# ec-p256`, its request with `cmkp11 key csr`, signed by a throwaway CA. Each server runs
# twice from the same configuration, once with libp11's MODULE_PATH = cmkp11 and once =
# SoftHSM2, on 127.0.0.1 ports of 20000-20999 (BENCH_PORTS). Every connection is a full
# handshake (no session cache, no tickets): one ECDSA signature by the token key each.
# Prints per server: handshakes/s of both, the overall ratio and the median of the paired
# rounds' ratios (goal >= 0.95). Run as root (nginx workers as root, httpd children as
# www-data). Figures on a loaded machine are noise: compare the ratio, not the rates.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/lib.sh"

module="" handshakes=2000 rounds=20 threads=2
while [ $# -gt 0 ]; do
    case "$1" in
    --module) module="$2"; shift 2 ;;
    --handshakes) handshakes="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) cmk_die "unknown argument $1" ;;
    esac
done
[ -n "$module" ] || module="$(cmk_module_path release)"
case "$module" in /*) ;; *) module="$PWD/$module" ;; esac
[ -f "$module" ] || cmk_die "module $module not found (cargo build --release first)"
[ "$(id -u)" -eq 0 ] || cmk_die "run as root (nginx and httpd workers)"
direct="$(cmk_softhsm_module)" || cmk_die "SoftHSM2 module not found (scripts/setup.sh)"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
HTTPD=/usr/sbin/apache2
MODS=/usr/lib/apache2/modules
if [ ! -x "$NGINX" ] || [ ! -x "$HTTPD" ]; then
    cmk_die "nginx and apache2 are needed (scripts/setup.sh)"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-bench-tls.XXXXXX")"
chmod 700 "$work"
W="$work/tls"
mkdir -p "$W"
cmk_token_env "$W" bench-tls >/dev/null
export E2E_MODULE="$module" E2E_DIRECT_MODULE="$direct" E2E_WORK="$W" E2E_TOKEN=bench-tls \
    E2E_PORTS="${BENCH_PORTS:-20000-20999}" E2E_CMD_TIMEOUT=600
. "$ROOT/scripts/e2e/common.sh"

pids=()
# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
    local p
    for p in "${pids[@]}"; do stop_pid "$p"; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

run_cli create key create bench-ec --type ec-p256 --id b1 || cmk_die "key create: $(lastlog create)"
run_cli csr key csr bench-ec --subject "CN=cmkp11 bench" --san IP:127.0.0.1 --san DNS:localhost \
    --out "$W/ec.csr" || cmk_die "key csr: $(lastlog csr)"
make_ca "$W" || cmk_die "openssl could not make the test CA"
ca_sign "$W" "$W/ec.csr" "$W/ec.crt" >/dev/null 2>&1 || cmk_die "the test CA could not sign the request"
engine_cnf "$W/openssl-module.cnf" "$module"
engine_cnf "$W/openssl-direct.cnf" "$direct"
key_uri="pkcs11:token=bench-tls;id=%b1;type=private;pin-value=$E2E_PIN"
mkdir -p "$W/html"
echo bench >"$W/html/index.html"

# nginx INSTANCE PORT CNF: an nginx master with two workers (as root: the token is root's).
start_nginx() {
    local d="$W/nginx-$1"
    mkdir -p "$d/tmp"
    cat >"$d/nginx.conf" <<EOF
user root root;
worker_processes 2;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
$(for v in $E2E_MODULE_ENV; do printf 'env %s;\n' "$v"; done)
ssl_engine pkcs11;
events { worker_connections 512; }
http {
    access_log off;
    client_body_temp_path $d/tmp/body; proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi; uwsgi_temp_path $d/tmp/uwsgi; scgi_temp_path $d/tmp/scgi;
    ssl_protocols TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    server {
        listen 127.0.0.1:$2 ssl;
        ssl_certificate $W/ec.crt;
        ssl_certificate_key "engine:pkcs11:$key_uri";
        root $W/html;
    }
}
EOF
    OPENSSL_CONF="$3" "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" >"$d/stdout.log" 2>&1 &
    pids+=($!)
    wait_port "$2" 30 || cmk_die "nginx $1 did not start: $(tail -n 3 "$d/error.log")"
}

# httpd INSTANCE PORT CNF: Apache httpd (event MPM, children as www-data).
start_httpd() {
    local d="$W/httpd-$1"
    mkdir -p "$d"
    cat >"$d/httpd.conf" <<EOF
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
ThreadsPerChild 25
DocumentRoot "$W/html"
<Directory "$W/html">
    Require all granted
</Directory>
SSLCryptoDevice pkcs11
SSLProtocol -all +TLSv1.3
SSLSessionCache none
SSLSessionTickets off
Listen 127.0.0.1:$2
<VirtualHost 127.0.0.1:$2>
    SSLEngine on
    SSLCertificateFile $W/ec.crt
    SSLCertificateKeyFile "$key_uri"
</VirtualHost>
EOF
    OPENSSL_CONF="$3" "$HTTPD" -f "$d/httpd.conf" -DFOREGROUND >"$d/stdout.log" 2>&1 &
    pids+=($!)
    wait_port "$2" 30 || cmk_die "httpd $1 did not start: $(tail -n 3 "$d/error.log")"
}

grant_module_access www-data
chmod 755 "$W/html" && chmod 644 "$W/html/index.html" "$W/ec.crt"
read -r pn_m pn_d pa_m pa_d <<<"$(free_ports 4)"
start_nginx module "$pn_m" "$W/openssl-module.cnf"
start_nginx direct "$pn_d" "$W/openssl-direct.cnf"
start_httpd module "$pa_m" "$W/openssl-module.cnf"
start_httpd direct "$pa_d" "$W/openssl-direct.cnf"

printf 'bench-tls: %s handshakes per server and module, %s paired rounds, %s client threads, TLS 1.3, EC P-256 token key\n' \
    "$handshakes" "$rounds" "$threads"
printf 'bench-tls: cmkp11 %s vs SoftHSM2 %s; load average %s on %s CPUs\n' "$module" "$direct" \
    "$(cut -d' ' -f1-3 /proc/loadavg)" "$(nproc)"
per_round=$(((handshakes + rounds - 1) / rounds))
status=0
for server in nginx:"$pn_m":"$pn_d" httpd:"$pa_m":"$pa_d"; do
    IFS=: read -r name pm pd <<<"$server"
    # Warm-up: every worker has opened the token before the clock runs.
    "$CMK_PYTHON" "$ROOT/scripts/e2e/tls_burst.py" --cafile "$W/ca.crt" --tls 1.3 --threads "$threads" \
        --rounds 1 --count 40 "module=$pm" "direct=$pd" >/dev/null 2>&1
    if ! "$CMK_PYTHON" "$ROOT/scripts/e2e/tls_burst.py" --cafile "$W/ca.crt" --tls 1.3 \
        --threads "$threads" --rounds "$rounds" --count "$per_round" --deadline 1800 \
        "module=$pm" "direct=$pd" >"$W/burst-$name.log" 2>&1; then
        printf '%s: handshakes failed: %s\n' "$name" "$(tail -n 3 "$W/burst-$name.log" | tr '\n' ' ')"
        status=1
        continue
    fi
    m="$(sed -n 's/^module .*rate=\([0-9.]*\).*/\1/p' "$W/burst-$name.log")"
    d="$(sed -n 's/^direct .*rate=\([0-9.]*\).*/\1/p' "$W/burst-$name.log")"
    paired="$(sed -n 's/^paired_ratio .*median=\([0-9.]*\).*/\1/p' "$W/burst-$name.log")"
    printf '%-6s cmkp11 %8.1f/s  softhsm2 %8.1f/s  ratio %s overall, %s median of %s paired rounds (goal >= 0.95)\n' \
        "$name" "$m" "$d" "$(awk -v a="$m" -v b="$d" 'BEGIN { printf "%.3f", a / b }')" "${paired:-n/a}" "$rounds"
done
exit "$status"
