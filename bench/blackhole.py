#!/usr/bin/env python3
"""Time per session while the first of two failover servers is black-holed.

"before": retry_after = 0, retry_after_max = 0 (no health memory: every session retries the dead server)
"after":  the pool defaults (retry_after 1 s, retry_after_max 30 s)
connect_timeout is the default 2 s in both.  10 sequential sessions each.

    python3 bench/blackhole.py [--sessions 10]
"""
import argparse
import os
import socket
import sys
import threading
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--agiproxy", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="folder holding the agiproxy.py to measure (default: this checkout)")
    args = parser.parse_args()
    sys.path.insert(0, args.agiproxy)
    import agiproxy
    import logging
    agiproxy.log.addHandler(logging.NullHandler())
    agiproxy.log.propagate = False

    # The black hole: a listener that never accepts, its backlog full, so SYNs are dropped.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    hole_port = hole.getsockname()[1]
    fillers = []
    while True:
        try:
            probe = socket.create_connection(("127.0.0.1", hole_port), 0.1)
            fillers.append(probe)
        except socket.timeout:
            break
        if len(fillers) > 8:
            raise SystemExit("cannot black-hole a port here")

    # A healthy FastAGI server: one ANSWER per session.
    good = socket.socket()
    good.bind(("127.0.0.1", 0))
    good.listen(128)

    def serve(conn):
        with conn:
            data = b""
            while b"\n\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"ANSWER\n")
            conn.recv(4096)

    def accept():
        while True:
            try:
                conn, _ = good.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()

    header = agiproxy.synthetic_header("agi://127.0.0.1/measure")
    results = {}
    for label, pool_extra in (("before (retry_after=0, retry_after_max=0)", "retry_after = 0\nretry_after_max = 0\n"),
                              ("after (defaults)", "")):
        config = agiproxy.parse_config(
            "[agiproxy]\nlisten = 127.0.0.1:0\naccess_log = no\n"
            "[pool main]\n%sservers =\n    127.0.0.1:%d\n    127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
            % (pool_extra, hole_port, good.getsockname()[1]), "<measure>")
        proxy = agiproxy.Proxy(config)
        proxy.bind()
        proxy.serve()
        port = proxy.addresses[0][2]
        times = []
        try:
            for _ in range(args.sessions):
                started = time.monotonic()
                with socket.create_connection(("127.0.0.1", port), 10) as sock:
                    sock.sendall(header)
                    line = b""
                    while not line.endswith(b"\n"):
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        line += chunk
                    assert line == b"ANSWER\n", line
                    times.append(time.monotonic() - started)     # served: first command arrived
                    sock.sendall(b"200 result=0\n")
        finally:
            proxy.shutdown()
        results[label] = times
        print("%-42s n=%d mean=%7.1f ms  max=%7.1f ms  min=%6.1f ms  total=%6.2f s  per session: %s"
              % (label, len(times), 1000 * sum(times) / len(times), 1000 * max(times), 1000 * min(times),
                 sum(times), " ".join("%.0f" % (1000 * t) for t in times)))
    for sock in fillers + [hole, good]:
        sock.close()


if __name__ == "__main__":
    main()
