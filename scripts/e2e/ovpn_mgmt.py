#!/usr/bin/env python3
"""OpenVPN management client for scripts/e2e/openvpn.sh: answers the token PIN query.

    ovpn_mgmt.py PORT PIN SECONDS

Connects to the management interface on 127.0.0.1:PORT (openvpn --management ...
--management-query-passwords), answers each ">PASSWORD:Need '...' password" with PIN,
prints every line it reads, and once the state is CONNECTED prints "connected (PIN asked:
True|False)" and tells openvpn to stop (SIGTERM). Exits 1 if that does not happen within
SECONDS.
"""
import re, socket, sys, time
port, pin, deadline = int(sys.argv[1]), sys.argv[2], time.time() + float(sys.argv[3])
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("management interface not reachable")
        time.sleep(0.1)
f = s.makefile("rwb", buffering=0)
s.settimeout(max(1.0, deadline - time.time()))
s.sendall(b"state on\n")
asked = False
for raw in f:
    line = raw.decode(errors="replace").strip()
    print(line, flush=True)
    m = re.match(r">PASSWORD:Need '(.*)' password", line)
    if m:
        s.sendall(('password "%s" "%s"\n' % (m.group(1), pin)).encode())
        asked = True
    if ">STATE:" in line and ",CONNECTED," in line:
        print("connected (PIN asked: %s)" % asked)
        s.sendall(b"signal SIGTERM\n")
        sys.exit(0)
sys.exit(1)
