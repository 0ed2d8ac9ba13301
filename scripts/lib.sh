# shellcheck shell=bash
# Shared helpers for the cmkp11 scripts. Source it; it does not change shell options.
#
#   . "$(dirname "$0")/lib.sh"            (from scripts/)
#   . "$(dirname "$0")/../lib.sh"         (from scripts/e2e/)
#
# Everything here is a function or a read-only default; nothing runs on source except
# setting CMK_ROOT and putting ~/.cargo/bin on PATH when cargo is not found.

CMK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Test-only PINs (never use them for a real token).
CMK_USER_PIN="${CMK_USER_PIN:-1234}"
CMK_SO_PIN="${CMK_SO_PIN:-12345678}"

# Python with the Debian PyKCS11 package (a pyenv/venv python3 on PATH would not see it).
CMK_PYTHON="${CMK_PYTHON:-/usr/bin/python3}"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
    export PATH
fi

cmk_info() { printf '==> %s\n' "$*" >&2; }
cmk_warn() { printf 'warning: %s\n' "$*" >&2; }
cmk_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# cmk_target_dir: cargo's target directory (honours CARGO_TARGET_DIR).
cmk_target_dir() {
    local t="${CARGO_TARGET_DIR:-$CMK_ROOT/target}"
    case "$t" in
    /*) printf '%s\n' "$t" ;;
    *) printf '%s\n' "$CMK_ROOT/$t" ;;
    esac
}

# cmk_module_path [release|debug]: path of the built libcmkp11.so for that profile
# (default release). Prints the path even when the file does not exist yet.
cmk_module_path() {
    printf '%s/%s/libcmkp11.so\n' "$(cmk_target_dir)" "${1:-release}"
}

# cmk_find_module: the newest built libcmkp11.so (release preferred on a tie), or fail.
cmk_find_module() {
    local r d
    r="$(cmk_module_path release)"
    d="$(cmk_module_path debug)"
    if [ -f "$r" ] && { [ ! -f "$d" ] || [ ! "$d" -nt "$r" ]; }; then
        printf '%s\n' "$r"
    elif [ -f "$d" ]; then
        printf '%s\n' "$d"
    else
        return 1
    fi
}

# cmk_module_ready MODULE: true when MODULE exports C_GetFunctionList.
cmk_module_ready() {
    [ -f "$1" ] && nm -D --defined-only "$1" 2>/dev/null | grep -w C_GetFunctionList >/dev/null
}

# cmk_softhsm_module: path of SoftHSM2's PKCS#11 module.
cmk_softhsm_module() {
    local p
    for p in "${SOFTHSM2_MODULE:-}" /usr/lib/softhsm/libsofthsm2.so \
        /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
        /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
        /usr/local/lib/softhsm/libsofthsm2.so; do
        if [ -n "$p" ] && [ -f "$p" ]; then
            printf '%s\n' "$p"
            return 0
        fi
    done
    return 1
}

# The token implementation behind cmkp11 for cmk_make_token / cmk_write_config:
# softhsm2 (default) or kryoptic (the second backend, built by scripts/setup.sh).
CMK_BACKEND="${CMK_BACKEND:-softhsm2}"

# kryoptic: the release scripts/setup.sh builds (from crates.io) and where it installs it.
export CMK_KRYOPTIC_VERSION=1.0.0
# Its default features less EdDSA, whose OpenSSL parameters need OpenSSL >= 3.2.
export CMK_KRYOPTIC_FEATURES=dynamic,sqlitedb,ecdsa,ecdh,ec_montgomery,hash_all,kdf_all,rsa
cmk_kryoptic_dir() {
    if [ "$(id -u)" -eq 0 ]; then
        printf '/usr/local/lib/kryoptic\n'
    else
        printf '%s/.local/lib/kryoptic\n' "$HOME"
    fi
}

# cmk_kryoptic_module: path of kryoptic's PKCS#11 module (KRYOPTIC_MODULE overrides).
cmk_kryoptic_module() {
    local p
    for p in "${KRYOPTIC_MODULE:-}" /usr/local/lib/kryoptic/libkryoptic_pkcs11.so \
        "$HOME/.local/lib/kryoptic/libkryoptic_pkcs11.so"; do
        if [ -n "$p" ] && [ -f "$p" ]; then
            printf '%s\n' "$p"
            return 0
        fi
    done
    return 1
}

# cmk_backend_module: the PKCS#11 module of $CMK_BACKEND.
cmk_backend_module() {
    case "$CMK_BACKEND" in
    softhsm2) cmk_softhsm_module ;;
    kryoptic) cmk_kryoptic_module ;;
    *) cmk_die "unknown backend $CMK_BACKEND (softhsm2 or kryoptic)" ;;
    esac
}

# cmk_make_token DIR [LABEL]: a private token of $CMK_BACKEND in DIR (see
# cmk_make_softhsm2_token and cmk_make_kryoptic_token).
cmk_make_token() {
    case "$CMK_BACKEND" in
    softhsm2) cmk_make_softhsm2_token "$@" ;;
    kryoptic) cmk_make_kryoptic_token "$@" ;;
    *) cmk_die "unknown backend $CMK_BACKEND (softhsm2 or kryoptic)" ;;
    esac
}

# cmk_make_kryoptic_token DIR [LABEL]: a private kryoptic token in DIR (created if
# needed): DIR/kryoptic.conf (one slot, id 1, CKA_EC_POINT DER-encoded as PKCS#11 2.40
# and 3.0 define it) and its sqlite store DIR/kryoptic.sql. Initialises the token as
# LABEL (default cmkp11-test) with the test PINs unless it is initialised already.
# Exports KRYOPTIC_CONF=DIR/kryoptic.conf.
cmk_make_kryoptic_token() {
    local dir="$1" label="${2:-cmkp11-test}" module
    [ -n "$dir" ] || cmk_die "cmk_make_kryoptic_token: no directory"
    module="$(cmk_kryoptic_module)" || cmk_die "kryoptic module not found (run scripts/setup.sh)"
    mkdir -p "$dir"
    chmod 700 "$dir"
    printf '[ec_point_encoding]\nencoding = "Der"\n\n[[slots]]\nslot = 1\ndbtype = "sqlite"\ndbargs = "%s/kryoptic.sql"\n' \
        "$dir" >"$dir/kryoptic.conf"
    chmod 600 "$dir/kryoptic.conf"
    export KRYOPTIC_CONF="$dir/kryoptic.conf"
    if pkcs11-tool --module "$module" --list-slots 2>/dev/null |
        grep -Eq "^[[:space:]]*token label[[:space:]]+:[[:space:]]+${label}[[:space:]]*$"; then
        return 0
    fi
    if ! pkcs11-tool --module "$module" --slot 1 --init-token --label "$label" \
        --so-pin "$CMK_SO_PIN" >/dev/null 2>&1; then
        cmk_die "pkcs11-tool could not initialise kryoptic token '$label' in $dir"
    fi
    if ! pkcs11-tool --module "$module" --token-label "$label" --login --login-type so \
        --so-pin "$CMK_SO_PIN" --init-pin --new-pin "$CMK_USER_PIN" >/dev/null 2>&1; then
        cmk_die "pkcs11-tool could not set the user PIN of kryoptic token '$label' in $dir"
    fi
}

# cmk_make_softhsm2_token DIR [LABEL]: a private SoftHSM2 token store in DIR (created if needed):
# DIR/softhsm2.conf and DIR/tokens/. Initialises a token named LABEL (default
# cmkp11-test) with the test PINs unless a token with that label already exists there.
# Exports SOFTHSM2_CONF=DIR/softhsm2.conf.
cmk_make_softhsm2_token() {
    local dir="$1" label="${2:-cmkp11-test}"
    [ -n "$dir" ] || cmk_die "cmk_make_softhsm2_token: no directory"
    mkdir -p "$dir/tokens"
    chmod 700 "$dir" "$dir/tokens"
    printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
        "$dir" >"$dir/softhsm2.conf"
    chmod 600 "$dir/softhsm2.conf"
    export SOFTHSM2_CONF="$dir/softhsm2.conf"
    if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+${label}[[:space:]]*$"; then
        return 0
    fi
    softhsm2-util --init-token --free --label "$label" \
        --so-pin "$CMK_SO_PIN" --pin "$CMK_USER_PIN" >/dev/null ||
        cmk_die "softhsm2-util could not initialise token '$label' in $dir/tokens"
}

# cmk_write_config DIR [TOKEN_LABEL [LOG_LEVEL]]: writes DIR/cmkp11.toml (mode 600) with
# the module of $CMK_BACKEND as the backend; when TOKEN_LABEL is given, only that token is
# exposed. Exports CMKP11_CONFIG=DIR/cmkp11.toml.
cmk_write_config() {
    local dir="$1" label="${2:-}" level="${3:-warn}" backend
    backend="$(cmk_backend_module)" || cmk_die "$CMK_BACKEND module not found (run scripts/setup.sh)"
    mkdir -p "$dir"
    (
        umask 077
        {
            printf '# cmkp11 configuration written by scripts/lib.sh\n[backend]\nmodule = "%s"\n' "$backend"
            if [ -n "$label" ]; then
                printf 'tokens = ["%s"]\n' "$label"
            fi
            printf '\n[log]\nlevel = "%s"\n' "$level"
        } >"$dir/cmkp11.toml"
    )
    chmod 600 "$dir/cmkp11.toml"
    export CMKP11_CONFIG="$dir/cmkp11.toml"
}

# cmk_token_env DIR [LABEL]: cmk_make_token + cmk_write_config in one go.
cmk_token_env() {
    cmk_make_token "$1" "${2:-cmkp11-test}"
    cmk_write_config "$1" "${2:-cmkp11-test}"
}

# cmk_timeout SECONDS CMD...: run CMD, killed after SECONDS (then KILL 5 s later).
cmk_timeout() {
    local s="$1"
    shift
    timeout -k 5 "$s" "$@"
}

# cmk_elapsed START_EPOCH: "Mm SSs" since START_EPOCH.
cmk_elapsed() {
    local d=$(($(date +%s) - $1))
    printf '%dm %02ds' $((d / 60)) $((d % 60))
}
