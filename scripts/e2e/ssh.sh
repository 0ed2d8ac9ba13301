#!/usr/bin/env bash
# Client family: OpenSSH client authentication with token keys. Run by run.sh.
#
#  - an EC P-256 and an RSA-2048 signing CMK made by `cmkp11 key create --type` (the CLI
#    of this build), listed by `ssh-keygen -D MODULE`;
#  - a private sshd (run as root, its own config, host key and authorized_keys in the
#    scratch directory, 127.0.0.1 on a port of E2E_PORTS) accepts `ssh -o
#    PKCS11Provider=MODULE` with each key alone in authorized_keys (its log names the
#    key's fingerprint); a key not in the token is refused;
#  - ssh-agent with `-P` = the module's real path: `ssh-add -s` adds both keys, `ssh-add -l`
#    lists them, ssh logs in through the agent; `ssh-add -e` removes them;
#  - ssh-agent refuses a module outside its allow-list (`-P` naming a symlink to the module:
#    the agent compares the real path), with "agent refused operation".
# The token PIN reaches ssh and ssh-add through SSH_ASKPASS (SSH_ASKPASS_REQUIRE=force).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

W="$E2E_WORK"
SSHD=/usr/sbin/sshd
if ! have ssh || ! have ssh-keygen || ! have ssh-agent || ! have ssh-add || [ ! -x "$SSHD" ] ||
    [ ! -x "$E2E_CLI" ]; then
    skip ssh "ssh, ssh-keygen, ssh-agent, ssh-add (openssh-client), $SSHD (openssh-server) or $E2E_CLI missing (scripts/setup.sh installs them; cargo build --release)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    skip ssh "sshd needs root (privilege separation); run the suite as root"
    exit 0
fi

pids=()
# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
    local p
    for p in "${pids[@]}"; do stop_pid "$p"; done
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# --- keys: the CLI makes them; ssh-keygen -D lists them --------------------------------------
declare -A fp
for k in ec:ec-p256:51 rsa:rsa-2048:52; do
    IFS=: read -r name type id <<<"$k"
    if ! run_cli "create-$name" key create "ssh-$name" --type "$type" --id "$id" ||
        ! run_cli "csr-$name" key csr "ssh-$name" --subject "CN=ssh-$name" --out "$W/$name.csr" ||
        ! run "pub-$name" sh -c "openssl req -in '$W/$name.csr' -noout -pubkey >'$W/$name.pem'" ||
        ! run "ssh-pub-$name" sh -c "ssh-keygen -i -m PKCS8 -f '$W/$name.pem' >'$W/$name.pub'"; then
        fail "ssh-key-$name" "cmkp11 key create/csr or the public key conversion failed: $(lastlog "create-$name") $(lastlog "csr-$name") $(lastlog "ssh-pub-$name")"
        exit 0
    fi
    fp[$name]="$(ssh-keygen -l -f "$W/$name.pub" | awk '{print $2}')"
done
pass ssh-cli-keys

if run keygen-D ssh-keygen -D "$E2E_MODULE"; then
    grep -E '^(ecdsa-|ssh-rsa )' "$W/keygen-D.log" >"$W/token.pub"
    ok=1
    for name in ec rsa; do
        grep -qF "$(cut -d' ' -f2 "$W/$name.pub")" "$W/token.pub" || ok=0
    done
    if [ "$ok" = 1 ]; then
        pass ssh-keygen-D
    else
        fail ssh-keygen-D "the token's keys are not both listed: $(lastlog keygen-D 4)"
    fi
else
    fail ssh-keygen-D "$(lastlog keygen-D)"
fi

# --- sshd ------------------------------------------------------------------------------------
read -r port <<<"$(free_ports 1)"
ssh-keygen -q -t ed25519 -N '' -f "$W/host_key" >/dev/null
mkdir -p /run/sshd && chmod 755 /run/sshd # sshd's privilege separation directory (Debian creates it at boot)
: >"$W/authorized_keys"
cat >"$W/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $W/host_key
PidFile $W/sshd.pid
AuthorizedKeysFile $W/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowUsers root
LogLevel VERBOSE
EOF
"$SSHD" -D -e -f "$W/sshd_config" 2>"$W/sshd.log" &
pids+=($!)
if ! wait_port "$port" 20; then
    fail ssh-sshd "sshd did not listen on 127.0.0.1:$port: $(tail -n 3 "$W/sshd.log" | tr '\n' ' ')"
    exit 0
fi
note "sshd on 127.0.0.1:$port (pid ${pids[0]})"

# The PIN for ssh and ssh-add, as a desktop's askpass would give it.
printf '#!/bin/sh\nprintf "%%s\\n" "%s"\n' "$E2E_PIN" >"$W/askpass"
chmod 700 "$W/askpass"
export SSH_ASKPASS="$W/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY=:0
ssh_opts=(-F /dev/null -p "$port" -o StrictHostKeyChecking=no -o UserKnownHostsFile="$W/known_hosts"
    -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o ConnectTimeout=20)

# login NAME KEY ARGS...: authorized_keys holds only KEY's public key; ssh ARGS must log in,
# and sshd's log must name KEY's fingerprint.
login() {
    local name="$1" key="$2"
    shift 2
    cp "$W/$key.pub" "$W/authorized_keys"
    local marker="cmkp11-e2e-$name-$$"
    if ! run "$name" ssh "${ssh_opts[@]}" "$@" root@127.0.0.1 "echo $marker"; then
        fail "$name" "ssh failed: $(lastlog "$name") / sshd: $(tail -n 2 "$W/sshd.log" | tr '\n' ' ')"
    elif ! grep -q "^$marker\$" "$W/$name.log"; then
        fail "$name" "the remote command's output is missing: $(lastlog "$name")"
    elif ! grep -q "Accepted publickey for root .*${fp[$key]}" "$W/sshd.log"; then
        fail "$name" "sshd did not log the token key ${fp[$key]}: $(grep Accepted "$W/sshd.log" | tail -n 1)"
    else
        pass "$name"
    fi
}
login ssh-pkcs11provider-ec ec -o PKCS11Provider="$E2E_MODULE"
login ssh-pkcs11provider-rsa rsa -o PKCS11Provider="$E2E_MODULE"

# A key that is not in the token: refused, and the token keys are what ssh offered.
ssh-keygen -q -t ed25519 -N '' -f "$W/other" >/dev/null
cp "$W/other.pub" "$W/authorized_keys"
if run ssh-refused ssh "${ssh_opts[@]}" -o PKCS11Provider="$E2E_MODULE" root@127.0.0.1 true; then
    fail ssh-pkcs11provider-unauthorized "ssh logged in with no token key in authorized_keys"
elif grep -q 'Permission denied (publickey)' "$W/ssh-refused.log"; then
    pass ssh-pkcs11provider-unauthorized
else
    fail ssh-pkcs11provider-unauthorized "unexpected failure: $(lastlog ssh-refused)"
fi

# --- ssh-agent with the allow-list ----------------------------------------------------------
real="$(readlink -f "$E2E_MODULE")"
# start_agent SOCKET ALLOWLIST [-D|-d]: ssh-agent in the foreground of a background job
# (-d: also its debug log, which names refusals, in SOCKET.log).
start_agent() {
    rm -f "$1"
    ssh-agent "${3:--D}" -a "$1" -P "$2" >"$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        [ -S "$1" ] && return 0
        sleep 0.1
    done
    return 1
}
if ! start_agent "$W/agent.sock" "$real"; then
    fail ssh-agent "ssh-agent did not start: $(cat "$W/agent.sock.log")"
    exit 0
fi
export SSH_AUTH_SOCK="$W/agent.sock"
if run ssh-add-s ssh-add -s "$E2E_MODULE" </dev/null && run ssh-add-l ssh-add -l &&
    grep -qF "${fp[ec]}" "$W/ssh-add-l.log" && grep -qF "${fp[rsa]}" "$W/ssh-add-l.log"; then
    pass ssh-agent-add-s
    for key in ec rsa; do
        login "ssh-agent-login-$key" "$key" -o IdentitiesOnly=no
    done
    if run ssh-add-e ssh-add -e "$E2E_MODULE" && run ssh-add-l-empty ssh-add -l; then
        fail ssh-agent-remove "keys still listed after ssh-add -e: $(lastlog ssh-add-l-empty)"
    elif grep -q 'The agent has no identities' "$W/ssh-add-l-empty.log"; then
        pass ssh-agent-remove
    else
        fail ssh-agent-remove "$(lastlog ssh-add-e) $(lastlog ssh-add-l-empty)"
    fi
else
    fail ssh-agent-add-s "$(lastlog ssh-add-s) $(lastlog ssh-add-l)"
fi
unset SSH_AUTH_SOCK

# The allow-list holds real paths: a symlink to the module is not the module's path.
ln -sf "$real" "$W/libcmkp11-link.so"
if start_agent "$W/agent2.sock" "$W/libcmkp11-link.so" -d; then
    if SSH_AUTH_SOCK="$W/agent2.sock" run ssh-add-refused ssh-add -s "$W/libcmkp11-link.so" </dev/null; then
        fail ssh-agent-allowlist "ssh-agent accepted a module outside its -P list"
    elif grep -q 'agent refused operation' "$W/ssh-add-refused.log" &&
        grep -q 'refusing PKCS#11 add of "'"$real"'": provider not allowed' "$W/agent2.sock.log"; then
        pass ssh-agent-allowlist
        note "ssh-add: $(grep -v '^\$ ' "$W/ssh-add-refused.log" | tail -n 1); ssh-agent: $(grep refusing "$W/agent2.sock.log" | head -n 1)"
    else
        fail ssh-agent-allowlist "unexpected messages: $(lastlog ssh-add-refused) / $(tail -n 2 "$W/agent2.sock.log" | tr '\n' ' ')"
    fi
else
    fail ssh-agent-allowlist "second ssh-agent did not start"
fi
exit 0
