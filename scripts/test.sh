#!/usr/bin/env bash
# The README's second command: runs every check of the project and ends with a summary.
#
#   bash scripts/test.sh
#
# Steps: setup (packages), rustfmt, clippy, shellcheck, header freshness (cbindgen), Rust tests, the
# release build, the demo on a throw-away token, and the client end-to-end suite
# (scripts/e2e/run.sh) through target/release/libcmkp11.so, the backend matrix (tests and
# two e2e families over kryoptic, a second token implementation), and the Debian package
# (scripts/test-package.sh: build, install, smoke test through the installed service, purge). Every step runs even when an
# earlier one failed (except those that need the build); the exit status is non-zero if
# any step failed.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CMK_ROOT" || exit 1

start_all=$(date +%s)
names=()
results=()
times=()

# step NAME CMD...: runs CMD, records ok/FAILED and its duration.
step() {
    local name="$1" s rc
    shift
    printf '\n==== %s\n' "$name"
    s=$(date +%s)
    "$@"
    rc=$?
    names+=("$name")
    times+=("$(cmk_elapsed "$s")")
    if [ "$rc" -eq 0 ]; then results+=(ok); else results+=("FAILED (status $rc)"); fi
    return "$rc"
}
# skipped NAME REASON: records a step that could not run.
skipped() {
    names+=("$1")
    times+=("-")
    results+=("not run: $2")
}

check_header() {
    if [ ! -f cbindgen.toml ]; then
        echo "no cbindgen.toml: nothing to check"
        return 0
    fi
    [ -f include/cmkp11.h ] || {
        echo "include/cmkp11.h is missing (cbindgen.toml exists)"
        return 1
    }
    if ! command -v cbindgen >/dev/null 2>&1; then
        echo "installing cbindgen (cargo install cbindgen --locked)"
        cargo install cbindgen --locked --quiet || return 1
    fi
    # The header is generated from src/vendor.rs alone (as tests/header.rs does); without
    # that file, from the whole crate.
    local tmp rc input=.
    [ -f src/vendor.rs ] && input=src/vendor.rs
    tmp="$(mktemp)"
    cbindgen --quiet --config cbindgen.toml --output "$tmp" "$input" || {
        rm -f "$tmp"
        return 1
    }
    if diff -u include/cmkp11.h "$tmp"; then
        echo "include/cmkp11.h is up to date"
        rc=0
    else
        echo "include/cmkp11.h is stale: regenerate it with"
        echo "  cbindgen --config cbindgen.toml --output include/cmkp11.h $input"
        rc=1
    fi
    rm -f "$tmp"
    return "$rc"
}

# backend_matrix NAME: the backend matrix's second token. The ABI, policy, lifecycle and
# audit integration tests (tests/common: CMKP11_TEST_BACKEND) and the pkcs11-tool and
# PyKCS11 e2e families (their tokens made on NAME) again over token NAME behind cmkp11
# (kryoptic, built by setup.sh). README "Token differences" lists what differs from
# SoftHSM2 and the tests that show it.
backend_matrix() {
    local rc=0
    env CMKP11_TEST_BACKEND="$1" cargo test --no-fail-fast \
        --test abi --test attacks_refusals --test lifecycle --test audit_log \
        --test audit_integrity || rc=1
    bash scripts/e2e/run.sh --backend "$1" --module "$(cmk_module_path release)" \
        pkcs11-tool python || rc=1
    return "$rc"
}

run_demo() {
    local dir rc
    dir="$(mktemp -d "${TMPDIR:-/tmp}/cmkp11-demo.XXXXXX")"
    (
        cmk_make_token "$dir" cmkp11-demo &&
            cmk_write_config "$dir" cmkp11-demo &&
            for round in first second; do
                echo "-- $round run (the second reuses the wrap key)"
                cmk_timeout 120 "$(cmk_target_dir)/release/examples/demo" \
                    --module "$(cmk_module_path release)" --token cmkp11-demo \
                    --pin "$CMK_USER_PIN" || exit 1
                CMKP11_PIN="$CMK_USER_PIN" cmk_timeout 120 bash scripts/demo-cli.sh "$dir" || exit 1
            done
    )
    rc=$?
    rm -rf "$dir"
    return "$rc"
}

step setup bash scripts/setup.sh || {
    echo "setup failed; the remaining steps need its packages" >&2
}
step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
step shellcheck shellcheck -x -e SC1091,SC2001 scripts/*.sh scripts/e2e/*.sh .ci/run
step header check_header
# The integration tests load target/debug/libcmkp11.so, which `cargo test` alone does not
# build (it builds the rlib for the tests): build the cdylib first.
step "debug build" cargo build --workspace
step "cargo test" cargo test --workspace --all-targets --no-fail-fast
# Service mode: the same integration tests with a cmkp11d per test process owning the
# token and the module in client mode (tests/common: CMKP11_TEST_SERVICE). Files not
# listed use the application's own config, the admin interface or the CLI on the token,
# which service mode takes away from applications. Skipped here (they run in library
# mode above), each by design of service mode: gcm_length_queries (the client answers a
# decryption's length query with the exact length, not the ciphertext's length as a
# bound: the daemon has already decrypted), panic_never_crosses_the_c_boundary (the fault
# hook is in the daemon's runtime), so_login_works_once (SO logins are refused to
# applications: tests/service.rs asserts that).
step "service tests" env CMKP11_TEST_SERVICE=1 cargo test --no-fail-fast \
    --test legit_flows --test attacks --test threads --test fork --test abi \
    --test forwarding -- \
    --skip gcm_length_queries --skip panic_never_crosses_the_c_boundary \
    --skip so_login_works_once
if step "release build" cargo build --release --lib --bins --example demo; then
    step demo run_demo
    step e2e bash scripts/e2e/run.sh --module "$(cmk_module_path release)"
    step "backend kryoptic" backend_matrix kryoptic
    # The same families through the service: a cmkp11d per family owns its token.
    step "e2e service" bash scripts/e2e/run.sh --service --module "$(cmk_module_path release)"
    # Last: it installs the .deb system-wide (then purges it), which would change what
    # the steps above see (/etc/cmkp11/cmkp11.toml sends every application to the daemon).
    step package bash scripts/test-package.sh
else
    skipped demo "release build failed"
    skipped e2e "release build failed"
    skipped "e2e service" "release build failed"
    skipped "backend kryoptic" "release build failed"
    skipped package "release build failed"
fi

failed=0
printf '\n==== summary (%s)\n' "$(cmk_elapsed "$start_all")"
for i in "${!names[@]}"; do
    printf '  %-16s %-8s %s\n' "${names[$i]}" "${times[$i]}" "${results[$i]}"
    [ "${results[$i]}" = ok ] || failed=$((failed + 1))
done
if [ "$failed" -eq 0 ]; then
    echo "all ${#names[@]} steps passed"
else
    echo "$failed of ${#names[@]} steps failed or could not run"
fi
[ "$failed" -eq 0 ]
