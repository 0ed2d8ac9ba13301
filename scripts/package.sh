#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: the release build, man pages generated from the
# command-line definitions of cmkp11 and cmkp11d, then `cargo deb --no-build`. Prints the
# path of the .deb on stdout. Installs cargo-deb (pinned) when it is missing.
#
#   bash scripts/package.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CMK_ROOT"

CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    cmk_info "installing cargo-deb $CARGO_DEB_VERSION (cargo install --locked)"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet >&2
fi
cargo build --release --lib --bins >&2
target="$(cmk_target_dir)"
man="$target/man"
rm -rf "$man"
"$target/release/cmkp11" man "$man" >&2
"$target/release/cmkp11d" man "$man" >&2
gzip -9n "$man"/*.1
# cargo-deb prints the path of the package it wrote on stdout.
cargo deb --no-build --quiet --output "$target/debian/"
