#!/usr/bin/env python3
"""agiproxy benchmark: the same FastAGI workloads run DIRECT (clients ->
upstream) and THROUGH the proxy, side by side.

Stdlib only, Python 3.6+.  Run from the repo root:  python3 bench/bench.py
See bench/README.md for what is measured and how.
"""
import argparse
import ctypes
import ctypes.util
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKERS = os.path.join(HERE, "bench_workers.py")
sys.path.insert(0, HERE)
from bench_workers import raise_nofile  # noqa: E402  (the same limit for driver and workers)
DEFAULT_PROXY = "{python} {repo}/agiproxy.py -c {conf}"
CLK_TCK = os.sysconf("SC_CLK_TCK")

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


class BenchError(Exception):
    pass


class BenchTimeout(BenchError):
    pass


def log(msg):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def tail_of(path, lines):
    """The last *lines* lines of a log file, or '' if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def make_preexec(cpus):
    def preexec():
        # Die with the driver (PR_SET_PDEATHSIG=1), so a killed run leaves
        # nothing behind; then apply the CPU placement before exec.
        if _LIBC is not None:
            try:
                _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)
            except Exception:
                pass
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
    return preexec


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------ /proc helpers

def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()


def proc_tree(pid):
    """pid and all its live descendants (a --proxy command may be a wrapper
    or fork workers)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    """utime+stime (+ reaped children's) of the given processes, seconds."""
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / float(CLK_TCK)


def busy_cpu_seconds():
    """Busy time of all CPUs (user+nice+system+irq+softirq+steal) from /proc/stat."""
    with open("/proc/stat") as f:
        v = f.readline().split()[1:]
    ticks = sum(int(v[i]) for i in (0, 1, 2, 5, 6, 7) if i < len(v))
    return ticks / float(CLK_TCK)


def machine_busy(seconds):
    """CPUs kept busy by other processes over *seconds* (before anything starts)."""
    a, me = busy_cpu_seconds(), cpu_seconds([os.getpid()])
    time.sleep(seconds)
    return max(0.0, busy_cpu_seconds() - a - (cpu_seconds([os.getpid()]) - me)) / seconds


def status_kib(pids, key):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def fd_count(pids):
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            pass
    return n


def nofile_limit(pid):
    try:
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


# ----------------------------------------------------------------- workers

class Worker(object):
    """A bench_workers.py process driven by JSON lines over stdin/stdout."""

    def __init__(self, name, args, cpus, tmpdir):
        self.name = name
        self.errpath = os.path.join(tmpdir, name + ".stderr")
        self.errf = open(self.errpath, "wb")
        self.p = subprocess.Popen(
            [sys.executable, WORKERS] + args, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.errf, preexec_fn=make_preexec(cpus),
            close_fds=True)
        self.buf = b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.p.stdout, selectors.EVENT_READ)
        hello = self.recv(30)
        self.pid = hello["pid"]
        self.nofile = hello["nofile"]

    def stderr_tail(self):
        return tail_of(self.errpath, 15)

    def send(self, obj):
        try:
            self.p.stdin.write((json.dumps(obj) + "\n").encode("utf-8"))
            self.p.stdin.flush()
        except (OSError, ValueError) as e:
            raise BenchError("%s: cannot send command (%s); stderr:\n%s"
                             % (self.name, e, self.stderr_tail()))

    def recv(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("%s: no answer within %.0fs; stderr:\n%s"
                                 % (self.name, timeout, self.stderr_tail()))
            if self.sel.select(min(left, 1.0)):
                data = os.read(self.p.stdout.fileno(), 1 << 20)
                if not data:
                    raise BenchError("%s exited (rc=%s); stderr:\n%s"
                                     % (self.name, self.p.poll(), self.stderr_tail()))
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line.decode("utf-8"))

    def request(self, obj, timeout=30):
        self.send(obj)
        return self.recv(timeout)

    def stop(self):
        if self.p.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.p.stdin.close()
            except Exception:
                pass
            try:
                self.p.wait(3)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(3)
        for f in (self.p.stdout, self.errf):
            try:
                f.close()
            except Exception:
                pass
        self.sel.close()


class Proxy(object):
    def __init__(self, cmd_template, listen_port, upstream_port, cpus, tmpdir):
        self.port = listen_port
        conf = os.path.join(tmpdir, "agiproxy.conf")
        with open(conf, "w") as f:
            f.write("[agiproxy]\nlisten = 127.0.0.1:%d\nlog = stderr\n"
                    "log_level = warning\naccess_log = no\n\n"
                    "[pool bench]\nservers = 127.0.0.1:%d\n\n"
                    "[route all]\npath = *\npool = bench\n" % (listen_port, upstream_port))
        self.cmd = cmd_template.format(
            python=shlex.quote(sys.executable), repo=shlex.quote(REPO),
            conf=shlex.quote(conf), listen_port=listen_port,
            upstream_port=upstream_port, listen="127.0.0.1:%d" % listen_port,
            upstream="127.0.0.1:%d" % upstream_port)
        self.errpath = os.path.join(tmpdir, "proxy.stderr")
        self.errf = open(self.errpath, "wb")
        self.p = subprocess.Popen(shlex.split(self.cmd), stdin=subprocess.DEVNULL,
                                  stdout=self.errf, stderr=self.errf,
                                  preexec_fn=make_preexec(cpus), close_fds=True)
        self.pid = self.p.pid

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
                s.close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError("proxy not accepting on port %d within %.0fs; output:\n%s"
                         % (self.port, timeout, self.output_tail()))

    def check_alive(self):
        if self.p.poll() is not None:
            raise BenchError("proxy exited (rc=%s): %s\noutput:\n%s"
                             % (self.p.returncode, self.cmd, self.output_tail()))

    def output_tail(self):
        return tail_of(self.errpath, 20)

    def output_lines(self):
        try:
            with open(self.errpath, "rb") as f:
                return f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []

    def pids(self):
        return proc_tree(self.pid) if self.p.poll() is None else []

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.errf.close()


# ------------------------------------------------------------------- stats

def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = int(round(q / 100.0 * (len(sorted_vals) - 1)))
    return sorted_vals[max(0, min(len(sorted_vals) - 1, i))]


def summarize(ns_list):
    v = sorted(ns_list)
    return {"n": len(v), "p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99),
            "p999": pct(v, 99.9), "max": v[-1] if v else None}


def merge_errors(dst, src, prefix):
    for k, n in (src or {}).items():
        dst[prefix + k] = dst.get(prefix + k, 0) + n


def split(n, parts):
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class Bench(object):
    def __init__(self, args):
        self.a = args
        self.tmp = tempfile.mkdtemp(prefix="agibench-")
        self.proxy = None
        self.upstream = None
        self.clients = []
        self.extra = []
        self.results = {"runs": [], "idle": [], "notes": []}

    # -- setup / teardown
    def start(self):
        a = self.a
        allowed = sorted(os.sched_getaffinity(0))
        if a.pin_cpu is not None and a.pin_cpu not in allowed:
            raise BenchError("--pin-cpu %d not in allowed CPUs %s" % (a.pin_cpu, allowed))
        if a.pin_cpu is not None:
            self.proxy_cpus = {a.pin_cpu}
            self.harness_cpus = set(allowed) - self.proxy_cpus or set(allowed)
        else:
            self.proxy_cpus = None
            self.harness_cpus = None
        if self.harness_cpus:
            os.sched_setaffinity(0, self.harness_cpus)
        self.nofile = raise_nofile()
        self.up_port = free_port()
        self.px_port = free_port()
        while self.px_port == self.up_port:
            self.px_port = free_port()
        self.upstream = Worker("upstream", [
            "upstream", "--port", str(self.up_port), "--ports", str(self.px_port),
            "--k", str(a.k), "--session-timeout", str(a.timeout),
            "--max-life", str(a.budget + 60)], self.harness_cpus, self.tmp)
        for i in range(a.clients):
            self.clients.append(self.new_client(i + 1))
        log("upstream pid %d port %d, %d client procs, harness CPUs %s, nofile %d"
            % (self.upstream.pid, self.up_port, len(self.clients),
               sorted(self.harness_cpus) if self.harness_cpus else "all", self.nofile))
        self.proxy = Proxy(a.proxy, self.px_port, self.up_port, self.proxy_cpus, self.tmp)
        self.proxy.wait_ready(a.ready_timeout)
        time.sleep(0.2)  # let it settle before the at-rest RSS reading
        pids = self.proxy.pids()
        self.results["proxy"] = {
            "cmd": self.proxy.cmd, "pid": self.proxy.pid,
            "cpus": sorted(self.proxy_cpus) if self.proxy_cpus else "all",
            "nofile": nofile_limit(self.proxy.pid),
            "rss_start_kib": status_kib(pids, "VmRSS"), "fds_start": fd_count(pids)}
        log("proxy pid %d listening on %d (CPUs %s): %s" % (
            self.proxy.pid, self.px_port, self.results["proxy"]["cpus"], self.proxy.cmd))

    def new_client(self, wid):
        return Worker("client%d" % wid, [
            "client", "--wid", str(wid), "--max-life", str(self.a.budget + 60)],
            self.harness_cpus, self.tmp)

    def stop(self):
        for w in [self.proxy] + self.clients + self.extra + [self.upstream]:
            if w is None:
                continue
            try:
                w.stop()
            except Exception as e:
                log("cleanup of %s: %s" % (getattr(w, "name", "proxy"), e))

    def harness_pids(self):
        return [self.upstream.pid] + [c.pid for c in self.clients]

    # -- one measurement
    def measure(self, target, mode, conc=None, rate=None, duration=None, record=True):
        a = self.a
        port = self.px_port if target == "proxy" else self.up_port
        duration = a.duration if duration is None else duration
        self.proxy.check_alive()
        self.upstream.request({"cmd": "reset", "k": a.k})
        ppids = self.proxy.pids()
        pcpu0, hcpu0 = cpu_seconds(ppids), cpu_seconds(self.harness_pids())
        all0, me0 = busy_cpu_seconds(), cpu_seconds([os.getpid()])
        t0 = time.monotonic()
        jobs = []
        if mode == "run":
            for c, n in zip(self.clients, split(conc, len(self.clients))):
                if n:
                    jobs.append(c)
                    c.send({"cmd": "run", "port": port, "conc": n, "duration": duration,
                            "k": a.k, "timeout": a.timeout})
        else:
            for c, r in zip(self.clients, split(rate * 1000, len(self.clients))):
                if r:
                    jobs.append(c)
                    c.send({"cmd": "paced", "port": port, "rate": r / 1000.0,
                            "duration": duration, "k": a.k, "timeout": a.timeout,
                            "max_outstanding": a.max_outstanding})
        res = [c.recv(duration + a.timeout + 30) for c in jobs]
        wall = time.monotonic() - t0
        pcpu = cpu_seconds(ppids) - pcpu0
        hcpu = cpu_seconds(self.harness_pids()) - hcpu0
        other = busy_cpu_seconds() - all0 - pcpu - hcpu - (cpu_seconds([os.getpid()]) - me0)
        up = self.upstream.request({"cmd": "stats"}, 60)
        self.proxy.check_alive()
        errors = {}
        setup = []
        for r in res:
            merge_errors(errors, r["errors"], "client:")
            setup.extend(r["setup_ns"])
        merge_errors(errors, up["errors"], "upstream:")
        ok = sum(r["ok"] for r in res)
        if ok != up["ok"]:
            errors["count_mismatch"] = abs(ok - up["ok"])
        sps = sum(r["ok"] / r["elapsed"] for r in res if r["ok"])
        ncpu = len(self.harness_cpus) if self.harness_cpus else os.cpu_count()
        out = {"target": target, "mode": mode, "conc": conc, "rate": rate,
               "duration": duration, "sessions": ok, "sessions_per_s": sps,
               "cmd_rtt_ns": summarize(up["rtt_ns"]), "setup_ns": summarize(setup),
               "errors": errors, "error_count": sum(errors.values()),
               "upstream_empty_conns": up["empty"],
               "proxy_cpu_s": pcpu, "harness_busy": hcpu / (wall * ncpu),
               "proxy_busy": pcpu / wall,
               # CPU used by anything else on the machine (noise), in CPUs
               "other_busy": max(0.0, other) / wall,
               "wall_s": wall}
        if ok:
            out["proxy_cpu_us_per_session"] = pcpu / ok * 1e6
        if record:
            self.results["runs"].append(out)
        log("%s%-6s %-5s %-9s %7d sessions %8.0f/s  rtt p50 %6.1fus p99 %7.1fus  "
            "setup p99 %6.2fms  proxy cpu %.2fs  harness %3.0f%%  other %3.0f%%  errors %d" % (
                "" if record else "warm-up ", target, mode, ("c=%d" % conc) if mode == "run" else ("%g/s" % rate), ok, sps,
                (out["cmd_rtt_ns"]["p50"] or 0) / 1e3, (out["cmd_rtt_ns"]["p99"] or 0) / 1e3,
                (out["setup_ns"]["p99"] or 0) / 1e6, pcpu, 100 * out["harness_busy"],
                100 * out["other_busy"],
                out["error_count"]))
        if errors:
            log("  errors: %s" % errors)
        return out

    # -- idle sessions held through the proxy
    def idle(self, n):
        a = self.a
        self.proxy.check_alive()
        res = {"n": n, "errors": {}}
        need = n + 64
        if need > self.upstream.nofile:
            res["skipped"] = "upstream needs %d fds, limit %d" % (need, self.upstream.nofile)
            log("idle %d skipped: %s" % (n, res["skipped"]))
            self.results["idle"].append(res)
            return res
        plim = nofile_limit(self.proxy.pid)
        if plim is not None and 2 * n + 32 > plim:
            note = "proxy RLIMIT_NOFILE %d < %d needed for %d idle sessions" % (plim, 2 * n + 32, n)
            res["note"] = note
            log("warning: " + note)
        per_proc = max(1, self.nofile - 64)
        nproc = max(len(self.clients), -(-n // per_proc))
        while len(self.clients) + len(self.extra) < nproc:
            self.extra.append(self.new_client(100 + len(self.extra)))
        procs = (self.clients + self.extra)[:nproc]
        self.upstream.request({"cmd": "reset"})
        pids = self.proxy.pids()
        time.sleep(0.2)
        res["rss_before_kib"] = status_kib(pids, "VmRSS")
        res["fds_before"] = fd_count(pids)
        t0 = time.monotonic()
        shares = split(n, nproc)
        for c, share in zip(procs, shares):
            c.send({"cmd": "idle_open", "port": self.px_port, "n": share, "k": a.k,
                    "idle_timeout": a.budget, "open_timeout": a.idle_open_timeout,
                    "max_connecting": a.max_connecting})
        opened = 0
        for c in procs:
            r = c.recv(a.idle_open_timeout + 30)
            opened += r["open"]
            merge_errors(res["errors"], r["errors"], "client:")
        # All headers written; wait until the upstream holds every session.
        deadline = time.monotonic() + 60
        held = 0
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            h = self.upstream.request({"cmd": "held"})
            if h["held"] != held:
                last_change = time.monotonic()
            held = h["held"]
            if held >= opened or time.monotonic() - last_change > 10:
                break
            self.proxy.check_alive()
            time.sleep(0.1)
        res["open_s"] = time.monotonic() - t0
        res["opened"], res["held"] = opened, held
        if held < n:
            res["errors"]["not_held"] = n - held
        time.sleep(0.5)
        pids = self.proxy.pids()
        res["rss_held_kib"] = status_kib(pids, "VmRSS")
        res["fds_held"] = fd_count(pids)
        res["kib_per_session"] = ((res["rss_held_kib"] - res["rss_before_kib"]) / float(held)
                                  if held else None)
        for c in procs:
            c.request({"cmd": "idle_arm"})
        t1 = time.monotonic()
        # The upstream wakes every held session: one command each, then it closes.
        rel = self.upstream.request({"cmd": "release", "timeout": 90}, 60)
        for c in procs:
            c.send({"cmd": "idle_wait", "wait_timeout": 90})
        for c in procs:
            r = c.recv(120)
            if r["left"]:
                res["errors"]["client:idle_not_closed"] = res["errors"].get(
                    "client:idle_not_closed", 0) + r["left"]
            merge_errors(res["errors"], r["errors"], "client:")
        # Wait for the proxy to drop the sessions' fds, then read RSS again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.proxy.check_alive()
            if fd_count(self.proxy.pids()) <= res["fds_before"] + 2:
                break
            time.sleep(0.1)
        res["close_s"] = time.monotonic() - t1
        time.sleep(0.3)
        pids = self.proxy.pids()
        res["fds_after"] = fd_count(pids)
        res["rss_after_kib"] = status_kib(pids, "VmRSS")
        up = self.upstream.request({"cmd": "stats"}, 60)
        merge_errors(res["errors"], up["errors"], "upstream:")
        if res["fds_after"] > res["fds_before"] + 2:
            res["errors"]["proxy_fds_leaked"] = res["fds_after"] - res["fds_before"]
        res["released"] = rel["released"]
        res["error_count"] = sum(res["errors"].values())
        self.results["idle"].append(res)
        log("idle %d: opened %d held %d in %.1fs; RSS %.1f -> %.1f MiB (%.2f KiB/session), "
            "fds %d; after close %.1f MiB, fds %d; errors %d" % (
                n, opened, held, res["open_s"], res["rss_before_kib"] / 1024.0,
                res["rss_held_kib"] / 1024.0, res["kib_per_session"] or 0, res["fds_held"],
                res["rss_after_kib"] / 1024.0, res["fds_after"], res["error_count"]))
        if res["errors"]:
            log("  errors: %s" % res["errors"])
        return res

    def run(self):
        a = self.a
        self.start()
        # Warm-up (not recorded): also proves both paths work before measuring.
        for target in ("direct", "proxy"):
            self.measure(target, "run", conc=8, duration=min(1.0, a.duration), record=False)
        for conc in a.concurrency:
            for target in ("direct", "proxy"):
                self.measure(target, "run", conc=conc)
        if a.rate > 0:
            for target in ("direct", "proxy"):
                self.measure(target, "paced", rate=a.rate)
        if not a.skip_idle:
            for n in a.idle:
                self.idle(n)
        pids = self.proxy.pids()
        self.results["proxy"]["rss_end_kib"] = status_kib(pids, "VmRSS")
        self.results["proxy"]["vmhwm_kib"] = status_kib(pids, "VmHWM")
        self.proxy.check_alive()
        lines = self.proxy.output_lines()
        self.results["proxy"]["log_lines"] = len(lines)
        self.results["proxy"]["log_head"] = lines[:5]


# ------------------------------------------------------------------ report

def fmt(v, scale=1.0, digits=1):
    if v is None:
        return "-"
    return "%.*f" % (digits, v / scale)


def render(results, args, out):
    mu = "\u00b5s"
    try:
        mu.encode(out.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        mu = "us"
    runs = results["runs"]

    def get(target, mode, conc=None):
        for r in runs:
            if r["target"] == target and r["mode"] == mode and (mode != "run" or r["conc"] == conc):
                return r
        return None

    rows = []

    def row(label, d, p, kind):
        if kind == "ratio":
            cmp_ = ("%.2fx" % (p / d)) if (d and p is not None) else "-"
        elif kind == "added":
            cmp_ = ("%+.1f" % (p - d)) if (d is not None and p is not None) else "-"
        else:
            cmp_ = ""
        rows.append((label, d, p, cmp_))

    def sep(title):
        rows.append((title, None, None, None))

    cfg = results["config"]
    px = results["proxy"]
    for conc in args.concurrency:
        d, p = get("direct", "run", conc), get("proxy", "run", conc)
        if not d or not p:
            continue
        sep("closed loop, concurrency %d" % conc)
        row("sessions/s c=%d" % conc, d["sessions_per_s"], p["sessions_per_s"], "ratio")
        for q in ("p50", "p99"):
            row("cmd RTT %s %s c=%d" % (q, mu, conc), _us(d["cmd_rtt_ns"][q]),
                _us(p["cmd_rtt_ns"][q]), "added")
        for q in ("p50", "p99"):
            row("setup %s ms c=%d" % (q, conc), _ms(d["setup_ns"][q]),
                _ms(p["setup_ns"][q]), "added")
        row("proxy CPU %s/session c=%d" % (mu, conc), None,
            p.get("proxy_cpu_us_per_session"), "")
        row("proxy CPU busy %% c=%d" % conc, None, 100 * p["proxy_busy"], "")
        row("harness CPU busy %% c=%d" % conc, 100 * d["harness_busy"],
            100 * p["harness_busy"], "")
        row("other processes' CPU %% c=%d (noise)" % conc, 100 * d["other_busy"],
            100 * p["other_busy"], "")
    d, p = get("direct", "paced"), get("proxy", "paced")
    if d and p:
        sep("paced %g sessions/s (open loop)" % args.rate)
        row("sessions/s achieved", d["sessions_per_s"], p["sessions_per_s"], "ratio")
        for q in ("p50", "p99", "p999"):
            row("cmd RTT %s %s" % (q, mu), _us(d["cmd_rtt_ns"][q]), _us(p["cmd_rtt_ns"][q]), "added")
        row("setup p99 ms", _ms(d["setup_ns"]["p99"]), _ms(p["setup_ns"]["p99"]), "added")
        row("proxy CPU %s/session" % mu, None, p.get("proxy_cpu_us_per_session"), "")
        row("other processes' CPU % (noise)", 100 * d["other_busy"], 100 * p["other_busy"], "")
    tot_cpu = sum(r["proxy_cpu_s"] for r in runs if r["target"] == "proxy")
    tot_sess = sum(r["sessions"] for r in runs if r["target"] == "proxy")
    sep("proxy CPU, all proxied runs (%d sessions)" % tot_sess)
    if tot_sess:
        row("proxy CPU-s per 1000 sessions", None, tot_cpu / tot_sess * 1000, "")
    if tot_cpu > 0:
        row("sessions per proxy CPU-second", None, tot_sess / tot_cpu, "")
    sep("proxy memory")
    row("RSS at start MiB", None, px["rss_start_kib"] / 1024.0, "")
    for r in results["idle"]:
        if r.get("skipped"):
            row("idle %d: skipped (%s)" % (r["n"], r["skipped"]), None, None, "")
            continue
        row("RSS before idle %d MiB" % r["n"], None, r["rss_before_kib"] / 1024.0, "")
        row("RSS idle %d sessions MiB" % r["n"], None, r["rss_held_kib"] / 1024.0, "")
        row("KiB/session (idle %d, %d held)" % (r["n"], r["held"]), None,
            r["kib_per_session"], "")
        row("RSS after idle %d closed MiB" % r["n"], None, r["rss_after_kib"] / 1024.0, "")
        row("idle %d: proxy fds held" % r["n"], None, r["fds_held"], "")
        row("idle %d: s to open all / to close all" % r["n"], None,
            "%.1f / %.1f" % (r["open_s"], r["close_s"]), "")
    if "vmhwm_kib" in px:
        row("RSS at end MiB", None, px["rss_end_kib"] / 1024.0, "")
        row("RSS peak (VmHWM) MiB", None, px["vmhwm_kib"] / 1024.0, "")
    sep("errors (target 0)")
    de = sum(r["error_count"] for r in runs if r["target"] == "direct")
    pe = sum(r["error_count"] for r in runs if r["target"] == "proxy")
    ie = sum(r.get("error_count", 0) for r in results["idle"])
    row("errors throughput+paced", de, pe, "")
    row("errors idle", None, ie, "")
    row("proxy log lines (1 = ready probe)", None, px.get("log_lines"), "")

    w = max(len(r[0]) for r in rows) + 2
    o = out.write
    o("agiproxy bench: python %s, k=%d, %gs/measurement, %d client procs, proxy CPUs %s, "
      "harness CPUs %s\n" % (cfg["python"], args.k, args.duration, args.clients,
                             px["cpus"], cfg["harness_cpus"]))
    o("proxy: %s\n" % px["cmd"])
    o("other processes busy before the run: %.0f%% of a CPU\n" % (100 * cfg["other_busy_start"]))
    o("%-*s %12s %12s %12s\n" % (w, "metric", "direct", "proxy", "proxy vs dir"))
    o("-" * (w + 39) + "\n")
    for label, d, p, c in rows:
        if c is None:
            o("[%s]\n" % label)
            continue
        o("%-*s %12s %12s %12s\n" % (w, label, _cell(d), _cell(p), c))
    o("notes: 'added' = proxy - direct.  Closed-loop RTT/setup at a concurrency where a\n"
      "  side is ~100% busy are queueing-dominated; the paced rows give the added latency.\n"
      "  direct runs are bounded by the harness CPU(s) (harness busy ~100%).\n")
    allerr = {}
    for r in runs + results["idle"]:
        for k, n in r.get("errors", {}).items():
            key = "%s %s" % (r.get("target", "idle"), k)
            allerr[key] = allerr.get(key, 0) + n
    if allerr:
        o("error detail: %s\n" % json.dumps(allerr, sort_keys=True))
    for n in results.get("notes", []):
        o("note: %s\n" % n)


def _us(ns):
    return None if ns is None else ns / 1e3


def _ms(ns):
    return None if ns is None else ns / 1e6


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, (int, str)):
        return str(v)
    if abs(v) >= 1000:
        return "%.0f" % v
    if abs(v) >= 100:
        return "%.1f" % v
    return "%.2f" % v


def parse_args(argv):
    ncpu = len(os.sched_getaffinity(0))
    ap = argparse.ArgumentParser(
        description="Benchmark a FastAGI proxy against direct connections.")
    ap.add_argument("--k", type=int, default=5, help="AGI commands per session (5)")
    ap.add_argument("--duration", type=float, default=8.0,
                    help="seconds per measurement (8: whole default run < 3 min)")
    ap.add_argument("--concurrency", default="1,8,64",
                    help="closed-loop concurrencies (1,8,64)")
    ap.add_argument("--idle", default="1000,9000", help="idle sessions held (1000,9000)")
    ap.add_argument("--skip-idle", action="store_true", help="skip the idle/RSS tests")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="paced sessions/s for the latency test (1000; 0 skips)")
    ap.add_argument("--pin-cpu", default="auto",
                    help="CPU for the proxy; load and upstream go on the others. "
                         "'auto' = last CPU if there are >= 2, 'none' = no pinning")
    ap.add_argument("--clients", type=int, default=2, help="load client processes (2)")
    ap.add_argument("--proxy", default=DEFAULT_PROXY,
                    help="proxy command; placeholders {python} {repo} {conf} {listen} "
                         "{listen_port} {upstream} {upstream_port} (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-session deadline s (10)")
    ap.add_argument("--ready-timeout", type=float, default=20.0,
                    help="seconds to wait for the proxy to accept (20)")
    ap.add_argument("--idle-open-timeout", type=float, default=120.0)
    ap.add_argument("--max-connecting", type=int, default=200,
                    help="idle test: connects in flight per client process (200)")
    ap.add_argument("--max-outstanding", type=int, default=2000,
                    help="paced test: sessions in flight per client process (2000)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = ap.parse_args(argv)
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x.strip()]
    a.idle = [int(x) for x in a.idle.split(",") if x.strip()]
    if a.pin_cpu == "auto":
        a.pin_cpu = max(os.sched_getaffinity(0)) if ncpu >= 2 else None
    elif a.pin_cpu in ("none", "-1", ""):
        a.pin_cpu = None
    else:
        a.pin_cpu = int(a.pin_cpu)
    nmeas = 2 * len(a.concurrency) + (2 if a.rate > 0 else 0) + 2
    a.budget = 120 + nmeas * (a.duration + a.timeout + 20) + \
        (0 if a.skip_idle else len(a.idle) * (a.idle_open_timeout + 200))
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()

    def on_alarm(signum, frame):
        raise BenchTimeout("whole-run deadline (%ds) exceeded" % a.budget)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))
    signal.alarm(int(a.budget))
    b = Bench(a)
    b.results["config"] = {
        "python": sys.version.split()[0], "k": a.k, "duration": a.duration,
        "concurrency": a.concurrency, "idle": [] if a.skip_idle else a.idle,
        "rate": a.rate, "clients": a.clients, "pin_cpu": a.pin_cpu,
        "harness_cpus": None, "other_busy_start": machine_busy(0.5)}
    if b.results["config"]["other_busy_start"] > 0.2:
        log("warning: other processes keep %.0f%% of a CPU busy before the run; "
            "see the 'other processes' rows" % (100 * b.results["config"]["other_busy_start"]))
    rc = 0
    try:
        b.run()
    except (BenchError, OSError) as e:
        log("FAILED: %s" % e)
        b.results["failure"] = str(e)
        rc = 2
    except KeyboardInterrupt:
        log("interrupted")
        b.results["failure"] = "interrupted"
        rc = 130
    finally:
        signal.alarm(0)
        b.stop()
    b.results["config"]["harness_cpus"] = sorted(b.harness_cpus) if getattr(
        b, "harness_cpus", None) else "all"
    b.results["elapsed_s"] = time.monotonic() - t0
    errs = sum(r["error_count"] for r in b.results["runs"]) + \
        sum(r.get("error_count", 0) for r in b.results["idle"])
    b.results["errors_total"] = errs
    if rc == 0 and not errs:
        shutil.rmtree(b.tmp, ignore_errors=True)
    else:
        log("logs (proxy.stderr, worker stderr) kept in %s" % b.tmp)
    if a.json:
        sys.stdout.write(json.dumps(b.results, indent=1, sort_keys=True) + "\n")
    elif "proxy" in b.results:
        render(b.results, a, sys.stdout)
    log("done in %.0fs, %d errors" % (b.results["elapsed_s"], errs))
    if rc == 0 and errs:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
