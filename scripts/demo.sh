#!/usr/bin/env bash
# The README's first command: installs what is needed, builds cmkp11, creates a private
# SoftHSM2 token under .cmkp11/ in the project folder (reused on later runs), and runs the
# demo (examples/demo.rs) through target/release/libcmkp11.so.
#
#   bash scripts/demo.sh
#
# The token's PINs are test PINs (user 1234, SO 12345678): .cmkp11/ is a sandbox, not a
# place for real keys.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$CMK_ROOT"

DEMO_DIR="$CMK_ROOT/.cmkp11"
DEMO_TOKEN="${CMKP11_DEMO_TOKEN:-cmkp11-demo}"

bash scripts/setup.sh

cmk_info "building libcmkp11.so and the demo (cargo build --release)"
cargo build --release --lib --bins --example demo

module="$(cmk_module_path release)"
[ -f "$module" ] || cmk_die "$module was not built"
cmk_module_ready "$module" ||
    cmk_die "$module does not export C_GetFunctionList yet (the module is still being written)"

cmk_info "token store: $DEMO_DIR (token '$DEMO_TOKEN')"
cmk_make_token "$DEMO_DIR" "$DEMO_TOKEN"
cmk_write_config "$DEMO_DIR" "$DEMO_TOKEN"
cmk_info "SOFTHSM2_CONF=$SOFTHSM2_CONF"
cmk_info "CMKP11_CONFIG=$CMKP11_CONFIG"

"$(cmk_target_dir)/release/examples/demo" \
    --module "$module" --token "$DEMO_TOKEN" --pin "$CMK_USER_PIN"

cmk_info "the operator's side: the cmkp11 command, key lifecycle and audit log"
CMKP11_PIN="$CMK_USER_PIN" bash scripts/demo-cli.sh "$DEMO_DIR"

cat <<EOF

To use this token yourself:
  export SOFTHSM2_CONF=$SOFTHSM2_CONF CMKP11_CONFIG=$CMKP11_CONFIG
  pkcs11-tool --module $module --list-slots
EOF
