#!/usr/bin/env python3
"""Worker processes for bench.py: a FastAGI upstream server and an
Asterisk-like load client, each a single-threaded selectors event loop.

Stdlib only, Python 3.6+.  Not meant to be run by hand: bench.py starts
these as `python bench_workers.py upstream|client ...` and drives them with
JSON lines on stdin; each command gets exactly one JSON line on stdout.
A worker exits when its stdin closes (the driver died) or after --max-life
seconds, so nothing outlives a run.
"""
import errno
import json
import os
import re
import resource
import selectors
import socket
import sys
import time

EV_R = selectors.EVENT_READ
EV_W = selectors.EVENT_WRITE

REPLY = b"200 result=0\n"
# Commands the upstream sends, cycled; lengths vary like a real AGI script.
COMMANDS = [
    b"ANSWER\n",
    b"GET VARIABLE CALLERID(num)\n",
    b'SET VARIABLE BENCH "1"\n',
    b'VERBOSE "agiproxy bench" 3\n',
    b'STREAM FILE beep ""\n',
    b"WAIT FOR DIGIT 1\n",
]

# Header in Asterisk's order.  agi_accountcode keeps Asterisk's trailing
# space ("agi_accountcode: \n"): a proxy that rewrites whitespace fails the
# byte-for-byte check.
HEADER_TEMPLATE = (
    "agi_network: yes\n"
    "agi_network_script: {script}?x=1\n"
    "agi_request: agi://127.0.0.1:{port}/{script}?x=1\n"
    "agi_channel: SIP/1001-0000001\n"
    "agi_language: en\n"
    "agi_type: SIP\n"
    "agi_uniqueid: 1795616129.{uid}\n"
    "agi_version: 18.0.0\n"
    "agi_callerid: 1001\n"
    "agi_calleridname: Bench\n"
    "agi_callingpres: 0\n"
    "agi_callingani2: 0\n"
    "agi_callington: 0\n"
    "agi_callingtns: 0\n"
    "agi_dnid: 100\n"
    "agi_rdnis: unknown\n"
    "agi_context: from-internal\n"
    "agi_extension: 100\n"
    "agi_priority: 1\n"
    "agi_enhanced: 0.0\n"
    "agi_accountcode: \n"
    "agi_threadid: 1404\n"
    "agi_arg_1: alpha\n"
    "\n"
)
SCRIPTS = ("bench", "idle")


def make_header(port, uid, script="bench"):
    return HEADER_TEMPLATE.format(port=port, uid=uid, script=script).encode("ascii")


_RE_SCRIPT = re.compile(rb"\nagi_network_script: (\w+)\?x=1\n")
_RE_PORT = re.compile(rb"\nagi_request: agi://127\.0\.0\.1:(\d+)/")
_RE_UID = re.compile(rb"\nagi_uniqueid: 1795616129\.(\d+)\n")


def check_header(hdr, ports):
    """Return the script name if hdr is exactly what a client sent, else None.

    The uniqueid and port vary per session/target, so they are parsed out
    and the expected bytes rebuilt from the template and compared whole."""
    m1 = _RE_SCRIPT.search(hdr)
    m2 = _RE_PORT.search(hdr)
    m3 = _RE_UID.search(hdr)
    if not (m1 and m2 and m3):
        return None
    script = m1.group(1).decode("ascii")
    port = int(m2.group(1))
    if script not in SCRIPTS or port not in ports:
        return None
    if make_header(port, int(m3.group(1)), script) != hdr:
        return None
    return script


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def emit(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Control(object):
    """Non-blocking line reader on stdin, registered in the worker's selector."""

    def __init__(self, sel):
        self.buf = b""
        self.eof = False
        os.set_blocking(0, False)
        sel.register(0, EV_R, None)

    def read(self):
        try:
            data = os.read(0, 65536)
        except (BlockingIOError, InterruptedError):
            return []
        if not data:
            self.eof = True
            return []
        self.buf += data
        out = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                out.append(json.loads(line.decode("utf-8")))
        return out


def count_err(d, kind, n=1):
    d[kind] = d.get(kind, 0) + n


# ---------------------------------------------------------------- upstream

class UConn(object):
    __slots__ = ("sock", "state", "buf", "i", "t_sent", "deadline", "k")

    def __init__(self, sock, deadline):
        self.sock = sock
        self.state = 0  # 0 header, 1 commands, 2 idle (held)
        self.buf = b""
        self.i = 0
        self.t_sent = 0.0
        self.deadline = deadline
        self.k = 0


class Worker(object):
    """The event loop both worker processes run: the driver's commands on stdin,
    socket events, and a sweep of deadlines every 0.25 s, for at most max_life.
    Subclasses provide command(), on_event() and sweep(), and may refine
    next_timeout() and progress()."""

    def next_timeout(self):
        return 0.25

    def progress(self):
        """Work due after each batch of events (none by default)."""

    def loop(self, max_life):
        t_end = time.monotonic() + max_life
        next_sweep = time.monotonic() + 0.25
        emit({"ready": True, "pid": os.getpid(), "nofile": raise_nofile()})
        while time.monotonic() < t_end:
            for key, mask in self.sel.select(self.next_timeout()):
                if key.data is None:
                    for m in self.ctl.read():
                        if not self.command(m):
                            return
                    if self.ctl.eof:
                        return
                else:
                    self.on_event(key.data, mask)
            self.progress()
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + 0.25


class Upstream(Worker):
    def __init__(self, port, ports, k, session_timeout, idle_timeout):
        self.sel = selectors.DefaultSelector()
        self.ctl = Control(self.sel)
        self.k = k
        self.ports = set(ports)
        self.session_timeout = session_timeout
        self.idle_timeout = idle_timeout
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(65535)
        ls.setblocking(False)
        self.lsock = ls
        self.sel.register(ls, EV_R, "listen")
        self.conns = {}
        self.reset()

    def reset(self):
        self.rtt = []
        self.ok = 0
        self.errors = {}
        self.empty = 0  # connections closed before sending anything (probes)
        self.accepted = 0

    def close(self, c):
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        self.conns.pop(id(c), None)

    def fail(self, c, kind):
        count_err(self.errors, kind)
        self.close(c)

    def accept(self):
        for _ in range(256):
            try:
                s, _a = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                count_err(self.errors, "accept_" + errno.errorcode.get(e.errno, str(e.errno)))
                return
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = UConn(s, time.monotonic() + self.session_timeout)
            self.conns[id(c)] = c
            self.sel.register(s, EV_R, c)
            self.accepted += 1

    def on_read(self, c):
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.fail(c, "reset")
        now = time.perf_counter()
        if not data:
            if c.state == 0 and not c.buf:
                self.empty += 1
                return self.close(c)
            if c.state == 2:
                return self.fail(c, "idle_closed_early")
            return self.fail(c, "early_eof")
        if c.state == 1:
            buf = c.buf + data if c.buf else data
            if not buf.endswith(b"\n"):
                c.buf = buf
                return
            c.buf = b""
            if buf != REPLY:
                return self.fail(c, "bad_reply")
            self.rtt.append(int((now - c.t_sent) * 1e9))
            c.i += 1
            if c.i >= c.k:
                self.ok += 1
                return self.close(c)
            return self.send_cmd(c)
        if c.state == 2:
            return self.fail(c, "idle_got_data")
        c.buf += data
        end = c.buf.find(b"\n\n")
        if end < 0:
            if len(c.buf) > 16384:
                self.fail(c, "header_too_long")
            return
        if end + 2 != len(c.buf):
            return self.fail(c, "data_after_header")
        script = check_header(c.buf, self.ports)
        c.buf = b""
        if script is None:
            return self.fail(c, "header_mismatch")
        if script == "idle":
            c.state = 2
            c.deadline = time.monotonic() + self.idle_timeout
            return
        c.state = 1
        c.k = self.k
        self.send_cmd(c)

    def send_cmd(self, c):
        cmd = COMMANDS[c.i % len(COMMANDS)]
        c.t_sent = time.perf_counter()
        try:
            n = c.sock.send(cmd)
        except OSError:
            return self.fail(c, "send")
        if n != len(cmd):
            self.fail(c, "short_send")

    def sweep(self):
        now = time.monotonic()
        for c in [c for c in self.conns.values() if c.deadline < now]:
            self.fail(c, "timeout_idle" if c.state == 2 else "timeout")

    def command(self, m):
        cmd = m.get("cmd")
        if cmd == "reset":
            self.reset()
            if "k" in m:
                self.k = int(m["k"])
            emit({"ok": True})
        elif cmd == "stats":
            emit({"rtt_ns": self.rtt, "ok": self.ok, "errors": self.errors,
                  "empty": self.empty, "accepted": self.accepted,
                  "open": len(self.conns)})
        elif cmd == "held":
            held = sum(1 for c in self.conns.values() if c.state == 2)
            emit({"held": held, "open": len(self.conns), "errors": self.errors})
        elif cmd == "release":
            # Wake the held sessions: each gets one command, then the
            # upstream closes.  (Closing without any command would look like
            # a broken server to a proxy that tracks early closes.)
            idle = [c for c in self.conns.values() if c.state == 2]
            deadline = time.monotonic() + float(m.get("timeout", 120))
            for c in idle:
                c.state = 1
                c.k = 1
                c.deadline = deadline
                self.send_cmd(c)
            emit({"released": len(idle)})
        elif cmd == "quit":
            emit({"bye": True})
            return False
        else:
            emit({"error": "unknown command %r" % cmd})
        return True

    def on_event(self, data, mask):
        if data == "listen":
            self.accept()
        else:
            self.on_read(data)


# ------------------------------------------------------------------ client

class CSess(object):
    __slots__ = ("sock", "state", "t0", "cmds", "out", "deadline", "idle", "buf")

    def __init__(self):
        self.state = 0  # 0 connecting/sending header, 1 waiting for commands
        self.cmds = 0
        self.buf = b""
        self.out = b""
        self.idle = False


class Client(Worker):
    def __init__(self, wid):
        self.sel = selectors.DefaultSelector()
        self.ctl = Control(self.sel)
        self.wid = wid
        self.seq = 0
        self.uid_base = wid * 100000000
        self.sess = {}
        self.job = None
        self.idle_open = 0     # idle sessions established (header sent)
        self.idle_live = 0     # idle sessions still open
        self.idle_failed = 0
        self.idle_pending = 0  # idle sessions still to start
        self.restart_at = []
        self.releasing = False

    # -- session lifecycle
    def start(self, port, idle=False):
        self.seq += 1
        s = CSess()
        s.idle = idle
        s.out = make_header(port, self.uid_base + self.seq, "idle" if idle else "bench")
        s.deadline = time.monotonic() + (self.idle_timeout if idle else self.timeout)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sock = sock
        s.t0 = time.perf_counter()
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.finish(s, "connect_" + errno.errorcode.get(err, str(err)), registered=False)
            return
        self.sess[id(s)] = s
        self.sel.register(sock, EV_W, s)

    def finish(self, s, err, registered=True):
        if registered:
            try:
                self.sel.unregister(s.sock)
            except (KeyError, ValueError):
                pass
            s.sock.close()
            self.sess.pop(id(s), None)
        j = self.job
        if s.idle:
            if s.state == 1:
                self.idle_live -= 1
            if err:
                count_err(self.errors, err)
                if s.state == 0:
                    self.idle_failed += 1
            return
        if err:
            count_err(self.errors, err)
        else:
            self.ok += 1
            self.t_last = time.perf_counter()
        if j is not None and j["cmd"] == "run" and time.perf_counter() < self.t_stop:
            if err:  # back off a little so a dead target doesn't spin
                self.restart_at.append(time.monotonic() + 0.01)
            else:
                self.start(self.port)

    def on_write(self, s):
        err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return self.finish(s, "connect_" + errno.errorcode.get(err, str(err)))
        try:
            n = s.sock.send(s.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.finish(s, "send_header")
        s.out = s.out[n:]
        if s.out:
            return  # partial header write: wait for writability again
        s.state = 1
        self.sel.modify(s.sock, EV_R, s)
        if s.idle:
            self.idle_open += 1
            self.idle_live += 1

    def on_read(self, s):
        try:
            data = s.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.finish(s, "reset")
        if not data:
            if s.idle and not self.releasing:
                return self.finish(s, "idle_closed_early")
            want = 1 if s.idle else self.k
            return self.finish(s, None if s.cmds == want else "early_eof")
        if s.idle and not self.releasing:
            return self.finish(s, "idle_got_data")
        if s.buf:
            data = s.buf + data
            s.buf = b""
        n = data.count(b"\n")
        if n == 0 or not data.endswith(b"\n"):
            if n:  # a full command plus the start of another
                return self.finish(s, "unexpected_data")
            s.buf = data  # split line: wait for the rest
            return
        if n != 1:
            # The upstream sends one command and waits for the reply.
            return self.finish(s, "unexpected_data")
        if s.cmds == 0 and not s.idle:
            self.setup.append(int((time.perf_counter() - s.t0) * 1e9))
        s.cmds += 1
        if s.cmds > self.k:
            return self.finish(s, "too_many_commands")
        try:
            if s.sock.send(REPLY) != len(REPLY):
                return self.finish(s, "short_send")
        except OSError:
            return self.finish(s, "send_reply")

    def sweep(self):
        now = time.monotonic()
        for s in [s for s in self.sess.values() if s.deadline < now]:
            self.finish(s, "timeout_idle" if s.idle else ("timeout_connect" if s.state == 0 else "timeout"))

    # -- jobs
    def command(self, m):
        cmd = m["cmd"]
        self.k = int(m.get("k", getattr(self, "k", 5)))
        self.timeout = float(m.get("timeout", 10.0))
        self.idle_timeout = float(m.get("idle_timeout", 300.0))
        if cmd in ("run", "paced"):
            self.port = int(m["port"])
            self.ok = 0
            self.errors = {}
            self.setup = []
            self.t_start = self.t_last = time.perf_counter()
            self.t_stop = self.t_start + float(m["duration"])
            self.job = m
            self.restart_at = []
            if cmd == "run":
                for _ in range(int(m["conc"])):
                    self.start(self.port)
            else:
                self.rate = float(m["rate"])
                self.n_paced = 0
                self.n_total = int(round(self.rate * float(m["duration"])))
                self.max_out = int(m.get("max_outstanding", 2000))
        elif cmd == "idle_open":
            self.port = int(m["port"])
            self.errors = {}
            self.idle_open = self.idle_live = self.idle_failed = 0
            self.idle_pending = int(m["n"])
            self.idle_n = int(m["n"])
            self.max_connecting = int(m.get("max_connecting", 200))
            self.releasing = False
            self.t_start = time.perf_counter()
            self.deadline = time.monotonic() + float(m.get("open_timeout", 120))
            self.job = m
        elif cmd == "idle_arm":
            # Sent before the upstream releases the held sessions, so their
            # EOFs count as the expected end, not as errors.
            self.releasing = True
            emit({"armed": len(self.sess)})
        elif cmd == "idle_wait":
            self.releasing = True
            self.deadline = time.monotonic() + float(m.get("wait_timeout", 60))
            self.job = m
        elif cmd == "quit":
            emit({"bye": True})
            return False
        else:
            emit({"error": "unknown command %r" % cmd})
        return True

    def progress(self):
        """Drive the current job; emit its result when it is done."""
        j = self.job
        if j is None:
            return
        cmd = j["cmd"]
        now = time.perf_counter()
        if cmd == "run":
            if self.restart_at:
                mono = time.monotonic()
                due = [t for t in self.restart_at if t <= mono]
                if due:
                    self.restart_at = [t for t in self.restart_at if t > mono]
                    if now < self.t_stop:
                        for _ in due:
                            self.start(self.port)
            if now >= self.t_stop and not self.sess:
                self.report()
        elif cmd == "paced":
            while self.n_paced < self.n_total and \
                    self.t_start + self.n_paced / self.rate <= now:
                self.n_paced += 1
                if len(self.sess) >= self.max_out:
                    count_err(self.errors, "overload_skipped")
                else:
                    self.start(self.port)
            if self.n_paced >= self.n_total and not self.sess:
                self.report()
        elif cmd == "idle_open":
            connecting = len(self.sess) - self.idle_live
            while self.idle_pending > 0 and connecting < self.max_connecting:
                self.idle_pending -= 1
                connecting += 1
                self.start(self.port, idle=True)
            done = self.idle_pending == 0 and self.idle_open + self.idle_failed >= self.idle_n
            if done or time.monotonic() > self.deadline:
                emit({"open": self.idle_open, "failed": self.idle_failed,
                      "live": self.idle_live, "errors": self.errors,
                      "elapsed": time.perf_counter() - self.t_start})
                self.errors = {}  # idle_wait reports only what happens next
                self.job = None
        elif cmd == "idle_wait":
            if not self.sess or time.monotonic() > self.deadline:
                emit({"left": len(self.sess), "errors": self.errors})
                for s in list(self.sess.values()):
                    self.finish(s, "idle_not_closed")
                self.job = None

    def next_timeout(self):
        j = self.job
        if j is not None and j["cmd"] == "paced" and self.n_paced < self.n_total:
            return max(0.0, self.t_start + self.n_paced / self.rate - time.perf_counter())
        if j is not None and j["cmd"] == "run" and self.restart_at:
            return 0.01
        return 0.1

    def report(self):
        emit({"ok": self.ok, "errors": self.errors, "setup_ns": self.setup,
              "elapsed": max(self.t_last - self.t_start, 1e-9),
              "started": self.seq})
        self.job = None

    def on_event(self, s, mask):
        if mask & EV_W:
            self.on_write(s)
        else:
            self.on_read(s)


def main(argv):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["upstream", "client"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ports", default="")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--wid", type=int, default=1)
    ap.add_argument("--session-timeout", type=float, default=10.0)
    ap.add_argument("--idle-timeout", type=float, default=300.0)
    ap.add_argument("--max-life", type=float, default=1800.0)
    a = ap.parse_args(argv)
    raise_nofile()
    if a.role == "upstream":
        ports = [int(p) for p in a.ports.split(",") if p] + [a.port]
        Upstream(a.port, ports, a.k, a.session_timeout, a.idle_timeout).loop(a.max_life)
    else:
        Client(a.wid).loop(a.max_life)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        pass
