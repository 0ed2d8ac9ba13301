#!/usr/bin/env python3
"""Bounded TLS handshake burst for scripts/e2e/nginx.sh.

    tls_burst.py --cafile CA --count N --rounds R [--threads T] [--tls 1.2|1.3] NAME=PORT...

Makes R rounds; in each round it makes N full TLS handshakes (new connection, no session
resumption, certificate verified against CA for 127.0.0.1) with every target in turn,
spread over T client threads. Alternating the targets round by round, in an order that is
reversed every other round (ABBA), keeps a change in the machine's load (other processes)
from favouring one of them. Prints one line per target:

    NAME handshakes=H errors=E seconds=S rate=H/S

and, with two targets A and B, the median over the rounds of A's rate / B's rate in that
round (robust against load that changes during the run):

    paired_ratio A/B median=M rounds=R

and exits 1 if any handshake failed. Every socket operation has a timeout and the whole run
has a deadline (--deadline seconds), so it always ends.
"""

import argparse
import socket
import ssl
import sys
import threading
import time


def one_round(ctx, port, count, threads, deadline, timeout):
    """Makes `count` handshakes with 127.0.0.1:port over `threads` threads.

    Returns (handshakes, errors, seconds, first_error)."""
    lock = threading.Lock()
    state = {"left": count, "ok": 0, "err": 0, "first": None}

    def worker():
        while True:
            with lock:
                if state["left"] == 0:
                    return
                state["left"] -= 1
            try:
                if time.monotonic() > deadline:
                    raise TimeoutError("run deadline passed")
                with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
                    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        tls.settimeout(timeout)
                        if tls.version() is None:
                            raise ssl.SSLError("no TLS version after the handshake")
                with lock:
                    state["ok"] += 1
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                with lock:
                    state["err"] += 1
                    if state["first"] is None:
                        state["first"] = repr(exc)

    start = time.monotonic()
    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(max(0.0, deadline - time.monotonic()) + timeout + 1)
    seconds = time.monotonic() - start
    return state["ok"], state["err"], seconds, state["first"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--count", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tls", choices=["1.2", "1.3"], default="1.3")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--deadline", type=float, default=300.0)
    ap.add_argument("targets", nargs="+", metavar="NAME=PORT")
    args = ap.parse_args()

    version = ssl.TLSVersion.TLSv1_3 if args.tls == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(args.cafile)
    ctx.minimum_version = version
    ctx.maximum_version = version
    ctx.check_hostname = True

    targets = []
    for t in args.targets:
        name, _, port = t.partition("=")
        targets.append((name, int(port)))
    totals = {name: [0, 0, 0.0, None] for name, _ in targets}
    deadline = time.monotonic() + args.deadline
    per_round = []
    for r in range(args.rounds):
        rates = {}
        order = targets if r % 2 == 0 else list(reversed(targets))
        for name, port in order:
            ok, err, secs, first = one_round(
                ctx, port, args.count, args.threads, deadline, args.timeout
            )
            rates[name] = ok / secs if secs > 0 else 0.0
            tot = totals[name]
            tot[0] += ok
            tot[1] += err
            tot[2] += secs
            if tot[3] is None:
                tot[3] = first
        per_round.append(rates)
    failed = False
    for name, _ in targets:
        ok, err, secs, first = totals[name]
        rate = ok / secs if secs > 0 else 0.0
        line = f"{name} handshakes={ok} errors={err} seconds={secs:.3f} rate={rate:.1f}"
        if first:
            line += f" first_error={first}"
        print(line, flush=True)
        failed = failed or err > 0
    if len(targets) == 2:
        a, b = targets[0][0], targets[1][0]
        ratios = sorted(x[a] / x[b] for x in per_round if x.get(b))
        if ratios:
            mid = len(ratios) // 2
            median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
            print(f"paired_ratio {a}/{b} median={median:.3f} rounds={len(ratios)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
