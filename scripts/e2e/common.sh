# shellcheck shell=bash
# Sourced by every client family script under scripts/e2e/. run.sh sets the environment:
#   E2E_MODULE         the PKCS#11 module under test (normally target/release/libcmkp11.so)
#   E2E_DIRECT_MODULE  the backend token's own module (SoftHSM2's unless run.sh --backend),
#                      for side-by-side comparisons
#   E2E_WORK           a private scratch directory for this family
#   E2E_TOKEN          the label of the family's private token
#   SOFTHSM2_CONF      the family's private SoftHSM2 configuration (KRYOPTIC_CONF: kryoptic's)
#   CMKP11_CONFIG      the family's cmkp11 configuration (mode 600)
# A family script prints one line per check: `PASS name`, `FAIL name: reason` or
# `SKIP name: reason`, and keeps the details of every command in $E2E_WORK/*.log.

. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

: "${E2E_MODULE:?run through scripts/e2e/run.sh}"
: "${E2E_DIRECT_MODULE:?run through scripts/e2e/run.sh}"
: "${E2E_WORK:?run through scripts/e2e/run.sh}"
: "${E2E_TOKEN:?run through scripts/e2e/run.sh}"

export E2E_PIN="$CMK_USER_PIN"
# Bound on any single client command (seconds).
E2E_CMD_TIMEOUT="${E2E_CMD_TIMEOUT:-120}"

pass() { printf 'PASS %s\n' "$1"; }
fail() {
    local name="$1"
    shift
    printf 'FAIL %s: %s\n' "$name" "$(printf '%s' "$*" | tr '\n' ' ' | cut -c1-400)"
}
skip() { printf 'SKIP %s: %s\n' "$1" "$2"; }
# note TEXT: context shown by run.sh under the checks (not counted).
note() { printf '  note: %s\n' "$*"; }

# run LOGNAME CMD...: runs CMD bounded by E2E_CMD_TIMEOUT with stdout+stderr in
# $E2E_WORK/LOGNAME.log; returns CMD's status (124 on timeout).
run() {
    local log="$E2E_WORK/$1.log"
    shift
    printf '$ %s\n' "$*" >"$log"
    cmk_timeout "$E2E_CMD_TIMEOUT" "$@" >>"$log" 2>&1
}

# lastlog LOGNAME: the last lines of a log, for a FAIL reason.
lastlog() {
    grep -v '^\$ ' "$E2E_WORK/$1.log" 2>/dev/null | tail -n "${2:-3}" | tr '\n' ' '
}

# policy_check NAME: true when NAME, a check of cmkp11's policy, should run; prints a SKIP
# (and returns false) when the module under test is SoftHSM2 itself (run.sh --direct).
policy_check() {
    if [ "${E2E_IS_DIRECT:-0}" = 1 ]; then
        skip "$1" "checks cmkp11's policy; the module under test is SoftHSM2 itself (--direct)"
        return 1
    fi
}

# have CMD: true when CMD is on PATH.
have() { command -v "$1" >/dev/null 2>&1; }

# --- shared by the server families (nginx, ssh, apache, curl, openvpn) -------------------
# What a family needs to know about how the module reaches the token is here, so that
# running the suite through cmkp11's service (run.sh --service: E2E_SERVICE=1, a cmkp11d
# per family, CMKP11_SERVICE set) changes these definitions, not the family scripts.
#
# E2E_MODULE_ENV: the names of the environment variables the module needs in every process
# that loads it (servers keep or pass exactly these to their workers and helpers). Library
# mode: the token's and cmkp11's configuration; service mode: the daemon's socket too.
token_env=SOFTHSM2_CONF
[ "$CMK_BACKEND" = kryoptic ] && token_env=KRYOPTIC_CONF
if [ "${E2E_SERVICE:-0}" = 1 ]; then
    E2E_MODULE_ENV="${E2E_MODULE_ENV:-$token_env CMKP11_CONFIG CMKP11_SERVICE}"
else
    E2E_MODULE_ENV="${E2E_MODULE_ENV:-$token_env CMKP11_CONFIG}"
fi

# grant_module_access USER: lets USER (a server's unprivileged workers) use the module the
# way root does here. Library mode: the module opens the token store and reads cmkp11's
# configuration itself, so the family's token directory and configuration are given to
# USER (modes unchanged: the configuration stays 600) and the scratch directories above
# them made traversable (711). Service mode: the daemon owns the token; USER needs only to
# reach its socket (mode 0666) through the traversable directories, and is one of the uids
# of the daemon's [[clients]] entry (run.sh).
grant_module_access() {
    local parent
    parent="$(dirname "$E2E_WORK")"
    case "$(basename "$parent")" in
    cmkp11-*) chmod 711 "$parent" ;; # run.sh's scratch directory, never /tmp itself
    *) cmk_die "grant_module_access: $E2E_WORK is not inside a cmkp11-* scratch directory" ;;
    esac
    chmod 711 "$E2E_WORK"
    [ "${E2E_SERVICE:-0}" = 1 ] && return 0
    if [ "$CMK_BACKEND" = kryoptic ]; then
        # sqlite writes its journal beside the store: the family directory itself.
        chown "$1:" "$E2E_WORK" "$KRYOPTIC_CONF" "$E2E_WORK/kryoptic.sql" "$CMKP11_CONFIG"
    else
        chown -R "$1:" "$(dirname "$SOFTHSM2_CONF")/tokens" "$SOFTHSM2_CONF" "$CMKP11_CONFIG"
    fi
}

# E2E_CLI: the `cmkp11` command built with the module (same target directory), else the
# release build of this checkout (when the module under test is SoftHSM2 itself).
if [ -z "${E2E_CLI:-}" ]; then
    E2E_CLI="$(dirname "$E2E_MODULE")/cmkp11"
    [ -x "$E2E_CLI" ] || E2E_CLI="$(cmk_target_dir)/release/cmkp11"
fi

# run_cli LOGNAME ARGS...: `run` of the cmkp11 command on the family's token (PIN from
# the environment). In service mode too it works on the token itself, as the operator
# who holds the token PIN does (the daemon shares the token with it).
run_cli() {
    local log="$1"
    shift
    run "$log" env -u CMKP11_SERVICE CMKP11_PIN="$E2E_PIN" "$E2E_CLI" --token "$E2E_TOKEN" "$@"
}

# free_ports N: N distinct TCP ports on 127.0.0.1 that are free now, from E2E_PORTS
# (default 20000-20999; several test runs share the machine), chosen at random.
free_ports() {
    "$CMK_PYTHON" - "$1" "${E2E_PORTS:-20000-20999}" <<'PY'
import random, socket, sys
lo, hi = (int(x) for x in sys.argv[2].split("-"))
want, found = int(sys.argv[1]), []
for p in random.sample(range(lo, hi + 1), hi - lo + 1):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    found.append(str(p))
    if len(found) == want:
        break
print(" ".join(found))
PY
}

# wait_port PORT [SECONDS]: true once something accepts TCP connections on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq $((${2:-20} * 10))); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# stop_pid PID: TERM, up to 10 s, then KILL; reaps it when it is our child.
stop_pid() {
    local pid="$1"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

# engine_cnf FILE MODULE: an openssl.cnf loading libp11's pkcs11 engine with MODULE_PATH.
engine_cnf() {
    local enginesdir
    enginesdir="$(openssl version -e 2>/dev/null | sed -E 's/^ENGINESDIR: "(.*)"$/\1/')"
    cat >"$1" <<CNF
openssl_conf = openssl_init

[openssl_init]
engines = engine_section

[engine_section]
pkcs11 = pkcs11_section

[pkcs11_section]
engine_id = pkcs11
dynamic_path = $enginesdir/pkcs11.so
MODULE_PATH = $2
init = 0
CNF
}

# engine_path: libp11's engine (may not exist).
engine_path() {
    printf '%s/pkcs11.so\n' "$(openssl version -e 2>/dev/null | sed -E 's/^ENGINESDIR: "(.*)"$/\1/')"
}

# make_ca DIR: a throwaway software CA (DIR/ca.key, DIR/ca.crt) standing in for the
# operator's CA, which signs the requests `cmkp11 key csr` writes.
make_ca() {
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=cmkp11 e2e CA $$" -keyout "$1/ca.key" -out "$1/ca.crt" >/dev/null 2>&1
}

# ca_sign DIR CSR CERT [EXTFILE]: the CA's certificate for CSR (its extensions copied).
ca_sign() {
    openssl x509 -req -in "$2" -CA "$1/ca.crt" -CAkey "$1/ca.key" -CAcreateserial -days 2 \
        -copy_extensions copy ${4:+-extfile "$4"} -out "$3"
}
