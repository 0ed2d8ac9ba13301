#!/usr/bin/env bash
# Installs what cmkp11's build, demo and tests need on Debian/Ubuntu. Idempotent: when every
# package is present it does nothing but check (no apt-get update). Not root: prints the
# command to run instead and fails if something is missing.
#
#   bash scripts/setup.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Build tools, the token, and the clients driven by scripts/e2e/; what kryoptic (the second
# token, built from crates.io below) needs to build: OpenSSL and sqlite headers, libclang
# for bindgen.
PACKAGES=(
    ca-certificates curl gcc libc6-dev binutils coreutils
    softhsm2 opensc openssl
    libssl-dev libsqlite3-dev libclang-dev pkg-config
    libengine-pkcs11-openssl
    gnutls-bin
    libnss3-tools
    p11-kit p11-kit-modules
    python3 python3-pykcs11
    nginx apache2
    openssh-client openssh-server
    openvpn
    openjdk-17-jdk-headless
    shellcheck
)

missing=()
for p in "${PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    cmk_info "setup: all ${#PACKAGES[@]} packages present"
elif ! command -v apt-get >/dev/null 2>&1; then
    cmk_die "setup: missing packages (${missing[*]}) and no apt-get: install their equivalents by hand"
elif [ "$(id -u)" -ne 0 ]; then
    printf 'setup: missing packages; as root run:\n  apt-get update && apt-get install -y --no-install-recommends %s\n' \
        "${missing[*]}" >&2
    exit 1
else
    cmk_info "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Keep package scripts from starting services (nginx would take port 80): the e2e
    # suite starts its own instances on 127.0.0.1 high ports.
    policy_rc=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_rc=/usr/sbin/policy-rc.d
    fi
    rc=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
    [ -z "$policy_rc" ] || rm -f "$policy_rc"
    [ "$rc" -eq 0 ] || cmk_die "setup: apt-get install failed (status $rc)"
fi

# Rust toolchain: cargo with rustfmt and clippy (the CI machine has it through rustup).
if ! command -v cargo >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && [ "${CMK_INSTALL_RUST:-1}" = 1 ]; then
        cmk_info "setup: cargo not found; installing the stable toolchain with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --profile minimal --component rustfmt,clippy
        PATH="$HOME/.cargo/bin:$PATH"
        export PATH
    else
        cmk_die "setup: cargo not found; install Rust (https://rustup.rs) with rustfmt and clippy"
    fi
fi
if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep "^$c" >/dev/null; then
            cmk_info "setup: adding rustup component $c"
            rustup component add "$c"
        fi
    done
fi

# kryoptic, the second token implementation the tests run over (CMKP11_TEST_BACKEND=kryoptic,
# scripts/e2e/run.sh --backend kryoptic): built from its crates.io release (with the
# Cargo.lock it ships) against the system OpenSSL and installed as
# $(cmk_kryoptic_dir)/libkryoptic_pkcs11.so, once: a stamp file names the version and
# features built. Releases after 1.0 need OpenSSL >= 3.2 (Debian 12 has 3.0); 1.0.0 builds
# against 3.0 without EdDSA. CMK_KRYOPTIC=0 skips it.
build_kryoptic() {
    local dest stamp want tmp src
    dest="$(cmk_kryoptic_dir)"
    stamp="$dest/BUILD"
    want="kryoptic $CMK_KRYOPTIC_VERSION features $CMK_KRYOPTIC_FEATURES"
    if [ -f "$dest/libkryoptic_pkcs11.so" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        cmk_info "setup: $want present in $dest"
        return 0
    fi
    cmk_info "setup: building $want (a few minutes, once)"
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-kryoptic.XXXXXX")"
    # A throw-away crate depending on the release makes cargo download its source.
    mkdir -p "$tmp/fetch/src"
    printf '[package]\nname = "fetch-kryoptic"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nkryoptic = { version = "=%s", default-features = false }\n' \
        "$CMK_KRYOPTIC_VERSION" >"$tmp/fetch/Cargo.toml"
    : >"$tmp/fetch/src/lib.rs"
    cargo fetch --quiet --manifest-path "$tmp/fetch/Cargo.toml" || {
        rm -rf "$tmp"
        return 1
    }
    src="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -type d \
        -name "kryoptic-$CMK_KRYOPTIC_VERSION" | head -n 1)"
    [ -f "$src/Cargo.toml" ] || {
        echo "kryoptic $CMK_KRYOPTIC_VERSION source not found after cargo fetch" >&2
        rm -rf "$tmp"
        return 1
    }
    cp -r "$src" "$tmp/kryoptic"
    if ! (cd "$tmp/kryoptic" && CARGO_TARGET_DIR="$tmp/target" cargo build --quiet --release --lib \
        --locked --no-default-features --features "$CMK_KRYOPTIC_FEATURES"); then
        rm -rf "$tmp"
        return 1
    fi
    mkdir -p "$dest"
    install -m 755 "$tmp/target/release/libkryoptic_pkcs11.so" "$dest/libkryoptic_pkcs11.so"
    printf '%s\n' "$want" >"$stamp"
    rm -rf "$tmp"
    cmk_info "setup: installed $dest/libkryoptic_pkcs11.so"
}

cmk_softhsm_module >/dev/null || cmk_die "setup: SoftHSM2 module not found after install"
if [ "${CMK_KRYOPTIC:-1}" != 0 ]; then
    build_kryoptic || cmk_die "setup: building kryoptic $CMK_KRYOPTIC_VERSION failed"
fi
cmk_info "setup: ok ($(cargo --version))"
