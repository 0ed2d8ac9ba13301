#!/usr/bin/env bash
# Client family: nginx serving TLS with private keys in the token. Run by run.sh.
#
# How nginx reaches the token: Debian's nginx 1.22 is built against OpenSSL 3 with ENGINE
# support, so the classic configuration works unchanged: `ssl_engine pkcs11;` (libp11's
# engine, libengine-pkcs11-openssl) loaded through an openssl.cnf named by OPENSSL_CONF
# whose engine section sets MODULE_PATH to the PKCS#11 module, and
#   ssl_certificate_key "engine:pkcs11:pkcs11:token=...;id=...;type=private;pin-value=...";
# (Debian 12 has no pkcs11-provider package, so the OpenSSL 3 provider route is not used.)
# nginx clears the environment of its workers: `env SOFTHSM2_CONF; env CMKP11_CONFIG;`
# keep the token's and cmkp11's configuration visible to the worker, which re-initialises
# the module after fork (libp11 notices the new PID and calls C_Initialize again).
#
# Checks: RSA and EC keys made with pkcs11-tool and self-signed certificates made with the
# engine (both through the module under test); nginx with a master and two workers on
# 127.0.0.1 high ports; curl fetches the page over TLS 1.2 and 1.3 with each key, verifying
# the certificate with --cacert; a reload (SIGHUP) replaces the workers and the page is
# still served; a burst of full handshakes against the module under test and against
# SoftHSM2 directly (two nginx instances from the same template, same run, rounds
# alternated) prints handshakes/s and the ratio. The burst fails only on errors; the ratio
# is reported (goal >= 0.95).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
burst="$(dirname "${BASH_SOURCE[0]}")/tls_burst.py"
enginesdir="$(openssl version -e 2>/dev/null | sed -E 's/^ENGINESDIR: "(.*)"$/\1/')"
engine="$enginesdir/pkcs11.so"
NGINX="$(command -v nginx || true)"
[ -n "$NGINX" ] || { [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx; }
if [ -z "$NGINX" ] || ! have curl || ! have openssl || [ ! -f "$engine" ] || ! have pkcs11-tool ||
    [ ! -x "$CMK_PYTHON" ]; then
    skip nginx "nginx, curl, openssl, libp11's engine ($engine), pkcs11-tool or $CMK_PYTHON missing (scripts/setup.sh installs nginx, curl, libengine-pkcs11-openssl, opensc, python3)"
    exit 0
fi
HANDSHAKES="${E2E_NGINX_HANDSHAKES:-1000}" # per key type and module, >= 1000 for the issue
ROUNDS=20 # paired rounds (module, direct) of HANDSHAKES/ROUNDS handshakes each

# --- nginx processes, always stopped by PID --------------------------------------------
masters=()
# shellcheck disable=SC2317 # called from the EXIT trap
# stop_nginx PID: fast shutdown (TERM), bounded; then KILL the master and its workers.
stop_nginx() {
    local pid="$1" kids
    kill -0 "$pid" 2>/dev/null || return 0
    kids="$(ps -o pid= --ppid "$pid" 2>/dev/null | tr '\n' ' ')"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        # shellcheck disable=SC2086
        kill -KILL "$pid" $kids 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}
# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
    local p
    for p in "${masters[@]}"; do stop_nginx "$p"; done
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# --- openssl.cnf per module: libp11's engine with MODULE_PATH ----------------------------
engine_cnf "$W/openssl-module.cnf" "$E2E_MODULE"
engine_cnf "$W/openssl-direct.cnf" "$E2E_DIRECT_MODULE"
uri() { printf 'pkcs11:token=%s;id=%s;type=private;pin-value=%s' "$E2E_TOKEN" "$1" "$E2E_PIN"; }

# --- keys (pkcs11-tool) and certificates (engine req -x509), through the module ---------
p11=(pkcs11-tool --module "$E2E_MODULE" --token-label "$E2E_TOKEN" --login --pin "$E2E_PIN")
# make_key NAME ID KEYTYPE: key pair in the token, public key exported, self-signed
# certificate for 127.0.0.1/localhost signed by the token key and checked by openssl.
make_key() {
    local name="$1" id="$2" type="$3"
    if ! run "keygen-$name" "${p11[@]}" --keypairgen --key-type "$type" --label "nginx-$name" --id "$id" ||
        ! run "read-$name" "${p11[@]}" --read-object --type pubkey --id "$id" -o "$W/$name.der" ||
        ! run "pem-$name" openssl pkey -pubin -inform DER -in "$W/$name.der" -out "$W/$name.pub.pem"; then
        fail "nginx-key-$name" "could not make and export the key: $(lastlog "keygen-$name") $(lastlog "read-$name")"
        return 1
    fi
    if ! run "req-$name" env OPENSSL_CONF="$W/openssl-module.cnf" openssl req -new -x509 \
        -engine pkcs11 -keyform engine -key "$(uri "%$id")" -sha256 -days 2 \
        -subj "/CN=cmkp11 e2e nginx $name" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
        -out "$W/$name.crt"; then
        fail "nginx-cert-$name" "req -x509 with the token key failed: $(lastlog "req-$name")"
        return 1
    fi
    if ! run "verify-cert-$name" openssl verify -CAfile "$W/$name.crt" "$W/$name.crt" ||
        ! cmp -s <(openssl x509 -in "$W/$name.crt" -noout -pubkey) "$W/$name.pub.pem"; then
        fail "nginx-cert-$name" "the certificate does not verify or is not for the token key: $(lastlog "verify-cert-$name")"
        return 1
    fi
    pass "nginx-cert-$name"
}
keys=()
make_key rsa 31 rsa:2048 && keys+=(rsa)
make_key ec 32 EC:prime256v1 && keys+=(ec)
if [ "${#keys[@]}" -eq 0 ]; then
    exit 0
fi
echo "hello from cmkp11 e2e $$" >"$W/index.html"
chmod 644 "$W/index.html"

# --- nginx instances: same template, one per module ----------------------------------------
# write_conf INSTANCE PORT_RSA PORT_EC: $W/INSTANCE/nginx.conf
write_conf() {
    local inst="$1" d="$W/$1" port k
    mkdir -p "$d/tmp" "$d/html"
    cp "$W/index.html" "$d/html/index.html"
    {
        # Workers run as root when the test runs as root: they must read the private token
        # store and cmkp11's config (mode 600) in the scratch directory.
        [ "$(id -u)" -eq 0 ] && printf 'user root root;\n'
        cat <<EOF
worker_processes 2;
daemon off;
master_process on;
pid $d/nginx.pid;
error_log $d/error.log notice;
$(for v in $E2E_MODULE_ENV; do printf 'env %s;\n' "$v"; done)
ssl_engine pkcs11;
events { worker_connections 512; }
http {
    access_log off;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
    # Every connection is a full handshake (one signature by the token key).
    ssl_session_cache off;
    ssl_session_tickets off;
EOF
        for k in "${keys[@]}"; do
            if [ "$k" = rsa ]; then port="$2"; else port="$3"; fi
            cat <<EOF
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate $W/$k.crt;
        ssl_certificate_key "engine:pkcs11:$(uri "%$([ "$k" = rsa ] && echo 31 || echo 32)")";
        root $d/html;
    }
EOF
        done
        printf '}\n'
    } >"$d/nginx.conf"
}

# start_nginx INSTANCE CNF: starts nginx (master in the foreground of a background job,
# PID recorded); waits up to 20 s for two workers and the listening ports.
declare -A master_of
start_nginx() {
    local inst="$1" cnf="$2" d="$W/$1" pid n
    OPENSSL_CONF="$cnf" "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" \
        >"$d/stdout.log" 2>&1 &
    pid=$!
    masters+=("$pid")
    master_of[$inst]="$pid"
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        n="$(ps -o pid= --ppid "$pid" | wc -l)"
        if [ "$n" -ge 2 ] && [ -s "$d/nginx.pid" ]; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

read -r p_mod_rsa p_mod_ec p_dir_rsa p_dir_ec <<<"$(free_ports 4)"
declare -A port
port[module - rsa]=$p_mod_rsa
port[module - ec]=$p_mod_ec
port[direct - rsa]=$p_dir_rsa
port[direct - ec]=$p_dir_ec
write_conf module "$p_mod_rsa" "$p_mod_ec"
write_conf direct "$p_dir_rsa" "$p_dir_ec"

if ! run nginx-test env OPENSSL_CONF="$W/openssl-module.cnf" "$NGINX" -t -p "$W/module" \
    -c "$W/module/nginx.conf" -e "$W/module/error.log"; then
    fail nginx-config "nginx -t refused the configuration: $(lastlog nginx-test)"
    exit 0
fi
if ! start_nginx module "$W/openssl-module.cnf"; then
    fail nginx-start "nginx (module under test) did not start with 2 workers: $(tail -n 3 "$W/module/error.log" | tr '\n' ' ')"
    exit 0
fi
mpid="${master_of[module]}"
workers_before="$(ps -o pid= --ppid "$mpid" | tr -d ' ' | sort | tr '\n' ' ')"
if [ "$(cat "$W/module/nginx.pid")" = "$mpid" ] && [ -n "$workers_before" ]; then
    pass nginx-master-and-workers
    note "nginx master $mpid, workers $workers_before(forked from the master)"
else
    fail nginx-master-and-workers "pid file $(cat "$W/module/nginx.pid") vs master $mpid, workers '$workers_before'"
fi

# fetch NAME PORT TLSVER CERT: curl over exactly TLS TLSVER, certificate verified against
# CERT for 127.0.0.1; the body must be the page and the log must show the version.
fetch() {
    local name="$1" p="$2" v="$3" crt="$4" inst="${5:-module}"
    if ! run "curl-$name" curl -sS -v --max-time 20 --tlsv"$v" --tls-max "$v" --cacert "$crt" \
        -o "$W/body-$name" "https://127.0.0.1:$p/"; then
        fail "$name" "curl failed: $(grep -E '^(curl|\* )' "$W/curl-$name.log" | tail -n 2 | tr '\n' ' ')"
    elif ! cmp -s "$W/body-$name" "$W/$inst/html/index.html"; then
        fail "$name" "the page served differs from the one written"
    elif ! grep -q "SSL connection using TLSv$v " "$W/curl-$name.log"; then
        fail "$name" "curl did not report TLSv$v: $(grep 'SSL connection' "$W/curl-$name.log")"
    else
        pass "$name"
    fi
}
# fetch_all SUFFIX: the page over TLS 1.2 and 1.3 with every key from the module's nginx.
fetch_all() {
    local k v
    for k in "${keys[@]}"; do
        for v in 1.2 1.3; do
            fetch "nginx-tls${v/./}-$k$1" "${port[module - $k]}" "$v" "$W/$k.crt"
        done
    done
}
fetch_all ""

# --- reload: SIGHUP, new workers, still serving -------------------------------------------
kill -HUP "$mpid"
reloaded=0
for _ in $(seq 200); do
    now="$(ps -o pid= --ppid "$mpid" | tr -d ' ' | sort | tr '\n' ' ')"
    left=0
    for w in $workers_before; do
        kill -0 "$w" 2>/dev/null && left=1
    done
    if [ "$left" = 0 ] && [ "$(wc -w <<<"$now")" -ge 2 ]; then
        reloaded=1
        break
    fi
    sleep 0.1
done
if [ "$reloaded" = 1 ] && kill -0 "$mpid" 2>/dev/null; then
    pass nginx-reload-sighup
    note "after SIGHUP: master $mpid, workers $now"
    fetch_all -after-reload
else
    fail nginx-reload-sighup "workers not replaced within 20 s (before: $workers_before, now: ${now:-none}): $(grep -E 'emerg|alert|crit' "$W/module/error.log" | tail -n 2 | tr '\n' ' ')"
fi
if grep -qE '\[(emerg|alert|crit)\]' "$W/module/error.log"; then
    fail nginx-error-log "$(grep -E '\[(emerg|alert|crit)\]' "$W/module/error.log" | head -n 2 | tr '\n' ' ')"
else
    pass nginx-error-log
fi

# --- handshake burst: module under test vs SoftHSM2 directly --------------------------------
if ! start_nginx direct "$W/openssl-direct.cnf"; then
    fail nginx-handshake-burst "nginx with SoftHSM2 directly did not start: $(tail -n 3 "$W/direct/error.log" | tr '\n' ' ')"
    exit 0
fi
per_round=$(((HANDSHAKES + ROUNDS - 1) / ROUNDS))
for k in "${keys[@]}"; do
    name="nginx-handshake-burst-$k-tls13"
    fetch "nginx-direct-tls13-$k" "${port[direct - $k]}" 1.3 "$W/$k.crt" direct
    if ! run "burst-$k" "$CMK_PYTHON" "$burst" --cafile "$W/$k.crt" --tls 1.3 --threads 2 \
        --rounds "$ROUNDS" --count "$per_round" --deadline $((E2E_CMD_TIMEOUT - 10)) \
        "module=${port[module - $k]}" "direct=${port[direct - $k]}"; then
        fail "$name" "handshakes failed: $(grep -E '^(module|direct) ' "$W/burst-$k.log" | tr '\n' ' ') $(lastlog "burst-$k" 1)"
        continue
    fi
    m_rate="$(sed -n 's/^module .*rate=\([0-9.]*\).*/\1/p' "$W/burst-$k.log")"
    d_rate="$(sed -n 's/^direct .*rate=\([0-9.]*\).*/\1/p' "$W/burst-$k.log")"
    m_n="$(sed -n 's/^module handshakes=\([0-9]*\).*/\1/p' "$W/burst-$k.log")"
    d_n="$(sed -n 's/^direct handshakes=\([0-9]*\).*/\1/p' "$W/burst-$k.log")"
    if [ -z "$m_rate" ] || [ -z "$d_rate" ] || [ "${m_n:-0}" -lt "$HANDSHAKES" ] || [ "${d_n:-0}" -lt "$HANDSHAKES" ]; then
        fail "$name" "fewer than $HANDSHAKES handshakes each: $(grep -E '^(module|direct) ' "$W/burst-$k.log" | tr '\n' ' ')"
        continue
    fi
    ratio="$(awk -v a="$m_rate" -v b="$d_rate" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }')"
    paired="$(sed -n 's/^paired_ratio .*median=\([0-9.]*\).*/\1/p' "$W/burst-$k.log")"
    load="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    pass "$name"
    note "$k TLS 1.3 full handshakes/s: module under test $m_rate ($m_n), SoftHSM2 direct $d_rate ($d_n); ratio $ratio overall, ${paired:-n/a} median of $ROUNDS paired rounds (goal >= 0.95); load average $load on $(nproc) CPUs"
    printf '%s tls1.3 module=%s direct=%s ratio=%s paired_median=%s handshakes=%s load=%s\n' \
        "$k" "$m_rate" "$d_rate" "$ratio" "${paired:-n/a}" "$m_n" "$load" >>"$W/handshake-ratio.txt"
done
exit 0
