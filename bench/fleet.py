#!/usr/bin/env python3
"""agiproxy fleet benchmark: the queue at twice the capacity, and how fast a pool
follows a DNS change.  Runs agiproxy.py as a child process on loopback.

    python3 bench/fleet.py                        # both, about 25 s
    python3 bench/fleet.py --duration 10 --hold 0.2 --max 20 --queue-timeout 2

queue:  one upstream with max=--max sessions, each held --hold seconds, so the
        capacity is max/hold sessions/s; clients start sessions at twice that rate
        for --duration seconds.  Reported: sessions served, BUSY, the time each
        served session waited before its first command (p50/p99; the queued time
        plus a loopback connect), and the proxy's own queue metrics.
dns:    a UDP DNS responder whose A record flips between 127.0.0.1 and 127.0.0.2
        every few seconds; reported: the time from each flip until a new session
        reaches the new address (resolve_interval = --resolve-interval).

Stdlib only, Python 3.6+.
"""
import argparse
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
import agiproxy  # noqa: E402


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Upstream(object):
    """A FastAGI server on *host*: reads the header, sends one command, reads its answer,
    holds the session *hold* seconds, closes."""

    def __init__(self, host, port, hold):
        self.hold, self.served = hold, 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                conn.settimeout(30)
                data = b""
                while b"\n\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                self.served += 1
                conn.sendall(b"VERBOSE \"bench\" 1\n")
                agiproxy.read_line(conn, time.monotonic() + 10)
                time.sleep(self.hold)
            except OSError:
                pass


def session(port, path="bench"):
    """One Asterisk-like session; return (outcome, seconds until its first line)."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), 30) as sock:
            sock.sendall(agiproxy.synthetic_header("agi://127.0.0.1/" + path))
            line, _ = agiproxy.read_line(sock, started + 30)
            waited = time.monotonic() - started
            busy = line.startswith(b"SET VARIABLE AGIPROXY_STATUS")
            sock.sendall(b"200 result=1\n")
            while sock.recv(4096):      # until the server (or the failure path) closes
                pass
            return ("BUSY" if b"BUSY" in line else line.split()[-1].decode()) if busy else "served", waited
    except OSError as exc:
        return "error: %s" % exc, time.monotonic() - started


def start_proxy(config):
    handle = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    handle.write(config)
    handle.close()
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "agiproxy.py"), "-c", handle.name],
                               stderr=subprocess.PIPE, universal_newlines=True)
    for line in process.stderr:
        if "listening on" in line:
            break
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
    return process, handle.name


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")


def bench_queue(args):
    upstream = Upstream("127.0.0.1", 0, args.hold)
    port, stats = free_port(), free_port()
    process, path = start_proxy("""
[agiproxy]
listen = 127.0.0.1:%d
stats_listen = 127.0.0.1:%d
access_log = no
[pool main]
queue_timeout = %g
max_queue = 0
servers = 127.0.0.1:%d max=%d
[route all]
path = *
pool = main
""" % (port, stats, args.queue_timeout, upstream.port, args.max))
    try:
        capacity = args.max / args.hold
        rate = 2 * capacity
        results, threads = [], []
        started = time.monotonic()
        count = int(rate * args.duration)
        for number in range(count):
            delay = started + number / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            thread = threading.Thread(target=lambda: results.append(session(port)), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - started
        metrics = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % stats, timeout=10).read().decode()
    finally:
        process.terminate()
        process.wait(30)
        os.unlink(path)
    served = [w for outcome, w in results if outcome == "served"]
    outcomes = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print("queue: capacity %d sessions at once x %.2fs = %.0f sessions/s; offered %.0f/s for %gs (%d sessions), "
          "queue_timeout %gs" % (args.max, args.hold, capacity, rate, args.duration, count, args.queue_timeout))
    print("queue: %s in %.1fs; served %d (%.0f/s), BUSY %d" % (
        ", ".join("%s=%d" % kv for kv in sorted(outcomes.items())), elapsed, len(served),
        len(served) / elapsed, outcomes.get("BUSY", 0)))
    print("queue: wait before the first command of served sessions: p50 %.3fs p99 %.3fs max %.3fs" % (
        percentile(served, 0.5), percentile(served, 0.99), max(served or [0])))
    for name in ("agiproxy_pool_queue_timeouts_total", "agiproxy_pool_queued_seconds_count",
                 "agiproxy_pool_queued_seconds_sum"):
        match = re.search(r"(?m)^%s\{[^}]*\} (\S+)" % name, metrics)
        print("queue: %s = %s" % (name, match.group(1) if match else "?"))


class Responder(object):
    """A UDP DNS server answering A queries for one name with ``self.address``."""

    def __init__(self, name):
        self.name, self.address = name, "127.0.0.1"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            query, peer = self.sock.recvfrom(512)
            asked, end = agiproxy.read_dns_name(query, 12)
            qtype = struct.unpack("!H", query[end:end + 2])[0]
            answers = [socket.inet_aton(self.address)] if qtype == agiproxy.DNS_A and asked == self.name else []
            reply = query[:2] + struct.pack("!HHHHH", 0x8180, 1, len(answers), 0, 0) + query[12:end + 4]
            for data in answers:
                reply += b"\xc0\x0c" + struct.pack("!HHIH", agiproxy.DNS_A, 1, 1, 4) + data
            self.sock.sendto(reply, peer)


def bench_dns(args):
    first = Upstream("127.0.0.1", 0, 0)
    second = Upstream("127.0.0.2", first.port, 0)
    dns = Responder("agi.bench.test")
    port = free_port()
    process, path = start_proxy("""
[agiproxy]
listen = 127.0.0.1:%d
dns_servers = 127.0.0.1:%d
access_log = no
[pool main]
resolve_interval = %g
servers = agi.bench.test:%d resolve
[route all]
path = *
pool = main
""" % (port, dns.port, args.resolve_interval, first.port))
    latencies = []
    try:
        for flip in range(args.flips):
            target = second if dns.address == "127.0.0.1" else first
            time.sleep(args.resolve_interval * (1 + (flip * 0.37) % 1))   # flips fall anywhere in the interval
            dns.address = "127.0.0.2" if target is second else "127.0.0.1"
            flipped, before = time.monotonic(), target.served
            while target.served == before and time.monotonic() - flipped < 30:
                session(port)
            latencies.append(time.monotonic() - flipped)
    finally:
        process.terminate()
        process.wait(30)
        os.unlink(path)
    print("dns: resolve_interval %gs, %d flips: first session on the new address after %s s (mean %.3fs)" % (
        args.resolve_interval, len(latencies), " ".join("%.3f" % l for l in latencies),
        sum(latencies) / len(latencies)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=0.2)
    parser.add_argument("--max", type=int, default=20)
    parser.add_argument("--queue-timeout", type=float, default=2.0)
    parser.add_argument("--resolve-interval", type=float, default=1.0)
    parser.add_argument("--flips", type=int, default=5)
    parser.add_argument("--only", choices=("queue", "dns"))
    args = parser.parse_args()
    if args.only != "dns":
        bench_queue(args)
    if args.only != "queue":
        bench_dns(args)


if __name__ == "__main__":
    main()
