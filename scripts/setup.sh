#!/usr/bin/env bash
# Installs what cmkp11's build, demo and tests need on Debian/Ubuntu. Idempotent: when every
# package is present it does nothing but check (no apt-get update). Not root: prints the
# command to run instead and fails if something is missing.
#
#   bash scripts/setup.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Build tools, the token, and the clients driven by scripts/e2e/.
PACKAGES=(
    ca-certificates curl gcc libc6-dev binutils coreutils
    softhsm2 opensc openssl
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

cmk_softhsm_module >/dev/null || cmk_die "setup: SoftHSM2 module not found after install"
cmk_info "setup: ok ($(cargo --version))"
