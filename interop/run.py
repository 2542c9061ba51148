#!/usr/bin/env python3
"""Interop suite: agiproxy in front of FastAGI servers written with real libraries.

For each library (panoramisk, pystrix, aioagi from PyPI; Perl Asterisk::AGI with
Net::Server from Debian; node ding-dong from npm) it installs the library into a
throwaway place, starts a small app written with that library's own API
(interop/apps/), and plays Asterisk toward it with the real header of
shared/asterisk-traces/a-plain.trace: once directly, with the header the proxy
is meant to send, and once through agiproxy (a real child process, on the
oldest and the newest Python).  Both legs must give the same transcript: the
commands the app sent (its SET VARIABLE AGI_SEEN reports what it saw of the
script, agi_request, the arguments and agi_x_fwd_for) and how it ended.

Then, per library, check = tcp and check = agi run for --check-seconds while the
app's CPU time (its whole process tree) and its log lines are counted, and one
call must still be served afterwards.

Development only, like bench/: stdlib Python, never imported by agiproxy.py or
its tests.  A library that cannot be installed is reported and fails the run.

    python3 interop/run.py [--libs panoramisk,pystrix] [--check-seconds 15]
                           [--agiproxy PATH] [--json results.json]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRACE = os.path.join(ROOT, "..", "shared", "asterisk-traces", "a-plain.trace")
PYENV = os.environ.get("PYENV_ROOT") or subprocess.run(
    ["sh", "-c", "pyenv root 2>/dev/null || echo $HOME/.pyenv"], stdout=subprocess.PIPE,
    universal_newlines=True).stdout.strip()
TIMEOUT = 10.0
SCRIPT = "path/script"          # the trace's agi_network_script, without its query
REWRITTEN = "v2/app"            # where the rewrite case sends it
CHANNEL = "Local/s@agitest-00000000;2"
LIBRARIES = ("panoramisk", "pystrix", "aioagi", "perl-asterisk-agi", "ding-dong")
#: A connection that closes before sending a header is a traceback in these libraries whatever the
#: close: pystrix raises AGISIGPIPEHangup in FastAGI() before any app code (FIN or reset alike);
#: panoramisk's reader raises ConnectionResetError on the reset (on a FIN it would spin at 100% CPU).
#: So check = tcp logs one traceback per check there; check = agi must log none anywhere.
TCP_CHECK_TRACEBACKS = ("panoramisk", "pystrix")


def say(*parts):
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def python(version):
    """The newest pyenv interpreter of *version* ("3.13"), or None."""
    root = os.path.join(PYENV, "versions")
    found = sorted((v for v in (os.listdir(root) if os.path.isdir(root) else ())
                    if v.startswith(version + ".") and v[len(version) + 1:].isdigit()),
                   key=lambda v: int(v.rsplit(".", 1)[1]))
    if not found:
        return shutil.which("python" + version)
    return os.path.join(root, found[-1], "bin", "python" + version)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(argv, **kwargs):
    """Run an install step; return (ok, last lines of its output)."""
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                              stdin=subprocess.DEVNULL, timeout=600, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return done.returncode == 0, "\n".join(done.stdout.strip().splitlines()[-5:])


# --- Installing the libraries -------------------------------------------------------------


class Installer(object):
    """Install each library into *place* (a temporary directory) and say how to start its app."""

    def __init__(self, place):
        self.place = place
        self.apt_updated = False

    def apt(self, *packages):
        if not self.apt_updated:
            self.apt_updated = True
            run(["apt-get", "update", "-qq"])
        return run(["apt-get", "install", "-y", "-qq"] + list(packages),
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))

    def venv(self, name, version, packages):
        """A venv of Python *version* with *packages*; return (python or None, why, versions)."""
        interpreter = python(version)
        if not interpreter:
            return None, "Python %s not found" % version, {}
        home = os.path.join(self.place, name)
        ok, out = run([interpreter, "-m", "venv", home])
        if ok and not run([os.path.join(home, "bin", "pip"), "show", "-q"] + packages)[0]:   # --cache kept it
            ok, out = run([os.path.join(home, "bin", "pip"), "install", "-q"] + packages)
        if not ok:
            return None, "pip install %s failed: %s" % (" ".join(packages), out), {}
        ok, out = run([os.path.join(home, "bin", "pip"), "list", "--format=json"])
        versions = dict((p["name"].lower(), p["version"]) for p in json.loads(out.splitlines()[-1])) if ok else {}
        return os.path.join(home, "bin", "python"), None, versions

    def install(self, library):
        """Return (argv prefix to start the app, version text) or raise RuntimeError(why)."""
        apps = os.path.join(HERE, "apps")
        if library in ("panoramisk", "pystrix"):
            interpreter, why, versions = self.venv("venv-" + library, "3.13", [library])
            if why:
                raise RuntimeError(why)
            return [interpreter, os.path.join(apps, library + "_app.py")], "%s %s (Python 3.13)" % (
                library, versions.get(library, "?"))
        if library == "aioagi":
            # aioagi pins aiohttp < 3.5, which predates Python 3.8's asyncio changes
            interpreter, why, versions = self.venv("venv-aioagi", "3.7", ["aioagi"])
            if why:
                raise RuntimeError(why)
            return [interpreter, os.path.join(apps, "aioagi_app.py")], "aioagi %s, aiohttp %s (Python 3.7)" % (
                versions.get("aioagi", "?"), versions.get("aiohttp", "?"))
        if library == "perl-asterisk-agi":
            probe = ["perl", "-MAsterisk::AGI", "-MNet::Server::Fork", "-e", "1"]
            if not run(probe)[0]:
                ok, out = self.apt("libasterisk-agi-perl", "libnet-server-perl")
                if not ok or not run(probe)[0]:
                    raise RuntimeError("apt-get install libasterisk-agi-perl libnet-server-perl failed: " + out)
            version = run(["dpkg-query", "-W", "-f", "${Version}", "libasterisk-agi-perl"])[1]
            server = run(["dpkg-query", "-W", "-f", "${Version}", "libnet-server-perl"])[1]
            return ["perl", os.path.join(apps, "perl_app.pl")], "Asterisk::AGI %s, Net::Server %s (Debian)" % (
                version, server)
        if library == "ding-dong":
            if not (shutil.which("node") and shutil.which("npm")):
                ok, out = self.apt("nodejs", "npm")
                if not ok:
                    raise RuntimeError("apt-get install nodejs npm failed: " + out)
            prefix = os.path.join(self.place, "node")
            ok, out = run(["npm", "--prefix", prefix, "install", "--no-audit", "--no-fund", "ding-dong"])
            if not ok:
                raise RuntimeError("npm install ding-dong failed: " + out)
            with open(os.path.join(prefix, "node_modules", "ding-dong", "package.json")) as handle:
                version = json.load(handle)["version"]
            node = run(["node", "--version"])[1]
            return (["env", "NODE_PATH=" + os.path.join(prefix, "node_modules"), "node",
                     os.path.join(apps, "dingdong_app.js")], "ding-dong %s (node %s)" % (version, node))
        raise RuntimeError("unknown library %s" % library)


# --- Processes: the app and agiproxy ------------------------------------------------------


class Child(object):
    """A child process whose output lines are collected in a file; its CPU time from /proc."""

    def __init__(self, argv, name, place, ready=None):
        self.name = name
        self.path = os.path.join(place, "%s-%d.log" % (name, free_port()))
        self.out = open(self.path, "wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out,
                                        start_new_session=True)
        if ready:
            deadline = time.monotonic() + 20
            while not ready():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("%s did not start: %s" % (name, self.text()[-800:]))
                time.sleep(0.05)

    def text(self):
        with open(self.path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def lines(self):
        return self.text().splitlines()

    def cpu(self):
        """User + system seconds of the process and all its descendants (live ones and reaped ones)."""
        ticks = os.sysconf("SC_CLK_TCK")
        children = {}
        stats = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % pid) as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(pid)] = fields
            children.setdefault(int(fields[1]), []).append(int(pid))
        total, todo, seen = 0.0, [self.process.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in stats:
                continue
            seen.add(pid)
            fields = stats[pid]
            total += sum(int(f) for f in fields[11:15]) / ticks    # utime stime cutime cstime
            todo.extend(children.get(pid, ()))
        return total

    def stop(self):
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.out.close()


def listening(port):
    def probe():
        # connect-and-close would itself be the bare probe the suite measures: read /proc instead
        want = ":%04X" % port
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as handle:
                    for line in handle.read().splitlines()[1:]:
                        fields = line.split()
                        if fields[1].endswith(want) and fields[3] == "0A":
                            return True
            except OSError:
                pass
        return False
    return probe


def start_proxy(interpreter, program, place, app_port, global_keys="", route="", pool_keys=""):
    port = free_port()
    conf = os.path.join(place, "agiproxy-%d.conf" % port)
    with open(conf, "w") as handle:
        handle.write("[agiproxy]\nlisten = 127.0.0.1:%d\nlog = stderr\nlog_level = info\n%s\n"
                     "[pool app]\nservers = 127.0.0.1:%d\n%s\n%s"
                     "[route all]\npath = *\npool = app\n" % (port, global_keys, app_port, pool_keys, route))
    child = Child([interpreter, program, "-c", conf], "agiproxy", place, ready=listening(port))
    child.port = port
    return child


# --- The fake Asterisk ------------------------------------------------------------------


def trace_text():
    """a-plain.trace from ../shared, or (in a checkout without it, as in CI) the same capture
    as test_agiproxy.py embeds it, read as text: the suite is not imported."""
    if os.path.exists(TRACE):
        with open(TRACE, "rb") as handle:
            return handle.read().decode("ascii")
    with open(os.path.join(ROOT, "test_agiproxy.py"), "rb") as handle:
        source = handle.read().decode("utf-8")
    return re.search(r'TRACES\["a-plain"\] = r"""(.*?)"""', source, re.S).group(1)


def trace_header():
    """The header lines (bytes, LF-terminated) Asterisk sent in a-plain.trace."""
    lines = []
    for raw in trace_text().splitlines():
        match = re.match(r"^(?:\+[\d.]+)?\s+(A>S|S>A) (.*)$", raw)
        if not match:
            continue
        if match.group(1) == "S>A":
            break
        lines.append(match.group(2).encode("ascii").decode("unicode_escape").encode("latin-1"))
    assert lines[-1] == b"\n", lines[-1]
    return lines


def edit_header(lines, replace=None, append=()):
    """*lines* with values replaced by name, and extra lines before the blank one."""
    replace = replace or {}
    out = []
    for line in lines[:-1]:
        name = line.split(b":", 1)[0].decode()
        out.append(("%s: %s\n" % (name, replace[name])).encode() if name in replace else line)
    return out + [("%s: %s\n" % item).encode() for item in append] + [b"\n"]


def reply(command, hangup_in_exec):
    """Asterisk's reply to one command line, as a-plain.trace and b3 show it."""
    verb = command.strip().upper()
    if verb.startswith(b"ANSWER"):
        return b"200 result=0\n"
    if verb.startswith(b"GET VARIABLE"):
        return ("200 result=1 (%s)\n" % CHANNEL).encode()
    if verb.startswith(b"SET VARIABLE") or verb.startswith(b"VERBOSE"):
        return b"200 result=1\n"
    if verb.startswith(b"EXEC"):
        if hangup_in_exec:
            time.sleep(0.1)
            return b"200 result=-1\nHANGUP\n"      # b3: Wait interrupted, then the unsolicited HANGUP
        time.sleep(0.2)
        return b"200 result=0\n"
    if verb.startswith(b"NOOP"):
        return b"200 result=0\n"
    return b"510 Invalid or unknown command\n"


def call(port, header_lines, hangup_in_exec=False, add_fwd_for=False):
    """Play one call toward *port*; return the transcript: commands (normalised) and the end."""
    sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    own = sock.getsockname()
    if add_fwd_for:                     # the direct leg: say what the proxy would add for this client
        header_lines = edit_header(header_lines, append=[("agi_x_fwd_for", "%s:%d" % own)])
    commands, end, buffer, hung_up = [], "timeout", b"", False
    deadline = time.monotonic() + TIMEOUT
    try:
        sock.sendall(b"".join(header_lines[:17]))       # two chunks, 17 + rest, as the trace saw them
        sock.sendall(b"".join(header_lines[17:]))
        while time.monotonic() < deadline:
            while b"\n" not in buffer:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buffer += chunk
            if b"\n" not in buffer:
                end = "closed" if not buffer else "closed mid-line %r" % buffer
                sock.sendall(b"HANGUP\n")               # finding 9: Asterisk says HANGUP after the server's FIN
                break
            line, _, buffer = buffer.partition(b"\n")
            text = line.decode("utf-8", "replace").replace(":%d" % own[1], ":CLIENTPORT")
            commands.append(text)
            if line[:7].lower() == b"failure":
                end = "FAILURE"
                sock.sendall(b"HANGUP\n")
                break
            if hung_up and line.strip().upper().startswith((b"ANSWER", b"EXEC", b"STREAM")):
                sock.sendall(b"511 Command Not Permitted on a dead channel or intercept routine\n")
                continue
            sock.sendall(reply(line, hangup_in_exec and not hung_up))
            hung_up = hung_up or (hangup_in_exec and line.strip().upper().startswith(b"EXEC"))
    except socket.timeout:
        end = "timeout"
    except OSError as exc:
        end = "error: %s" % exc
    finally:
        sock.close()
    return {"commands": commands, "end": end}


# --- The cases ---------------------------------------------------------------------------

#: name, [agiproxy] keys, [pool app] keys, route sections, header changes the proxy is meant to make
#: (given the app's port), hangup during EXEC Wait
CASES = [
    ("plain", "", "", "", lambda app_port: {}, False),
    ("forwarded_for", "forwarded_for = yes\n", "", "", lambda app_port: {"fwd": True}, False),
    ("rewrite", "", "", "[route rewritten]\nmatch = ^/%s$\nrewrite = /%s?{query}\npool = app\n" % (SCRIPT, REWRITTEN),
     lambda app_port: {"agi_network_script": REWRITTEN + "?x=1&y=2",
                       "agi_request": "agi://127.0.0.1:4600/%s?x=1&y=2" % REWRITTEN}, False),
    ("rewrite_host", "", "rewrite_host = yes\n", "",
     lambda app_port: {"agi_request": "agi://127.0.0.1:%d/%s?x=1&y=2" % (app_port, SCRIPT)}, False),
    ("hangup_in_exec", "", "", "", lambda app_port: {}, True),
]


def functional(library, argv, place, proxies, results):
    """Every case, direct and through each agiproxy; return the failures."""
    failures = []
    app_port = free_port()
    app = Child(argv + [str(app_port), SCRIPT, SCRIPT + "?x=1&y=2", REWRITTEN, REWRITTEN + "?x=1&y=2"],
                library, place, ready=listening(app_port))
    try:
        header = trace_header()
        for name, global_keys, pool_keys, route, changes, hangup in CASES:
            wanted = changes(app_port)
            fwd = wanted.pop("fwd", None)
            direct = call(app_port, edit_header(header, wanted), hangup, add_fwd_for=bool(fwd))
            row = {"library": library, "case": name, "direct": direct, "proxied": {}}
            for label, interpreter, program in proxies:
                proxy = start_proxy(interpreter, program, place, app_port, global_keys, route, pool_keys)
                try:
                    got = call(proxy.port, header, hangup)
                finally:
                    proxy.stop()
                row["proxied"][label] = got
                same = got == direct
                if not same:
                    failures.append("%s %s via agiproxy on %s: direct %s, proxied %s" % (
                        library, name, label, json.dumps(direct), json.dumps(got)))
            results.append(row)
            seen = [c for c in direct["commands"] if "AGI_SEEN" in c]
            say("  %-14s %-18s %s  end=%s  %s" % (
                library, name, "same" if all(v == direct for v in row["proxied"].values()) else "DIFFERENT",
                direct["end"], seen[0].split("AGI_SEEN", 1)[1].strip(' "') if seen else "(no AGI_SEEN)"))
    finally:
        app.stop()
    return failures


def checks(library, argv, place, interpreter, program, seconds, results):
    """check = tcp and check = agi for *seconds* each, on a fresh app: CPU, log lines, a call after."""
    failures = []
    for kind in ("tcp", "agi"):
        app_port = free_port()
        app = Child(argv + [str(app_port), SCRIPT, SCRIPT + "?x=1&y=2", "agiproxy-check"], library, place,
                    ready=listening(app_port))
        try:
            time.sleep(0.3)
            cpu0, lines0 = app.cpu(), len(app.lines())
            proxy = start_proxy(interpreter, program, place, app_port,
                                pool_keys="check = %s\ncheck_interval = 1\ncheck_timeout = 2\n" % kind)
            try:
                time.sleep(seconds)
                cpu = app.cpu() - cpu0
                lines = app.lines()[lines0:]
                proxy_lines = proxy.lines()
                after = call(proxy.port, trace_header())
            finally:
                proxy.stop()
            downs = [l for l in proxy_lines if " is down" in l]
            tracebacks = sum(1 for l in lines if l.startswith("Traceback"))
            served = bool(after["commands"]) and after["commands"][0].upper().startswith("ANSWER")
            row = {"library": library, "check": kind, "seconds": seconds, "cpu_seconds": round(cpu, 3),
                   "cpu_percent": round(100.0 * cpu / seconds, 2), "log_lines": len(lines),
                   "tracebacks": tracebacks, "server_marked_down": len(downs), "call_after": served,
                   "sample": lines[-3:]}
            results.append(row)
            say("  %-18s check=%s  cpu %.3fs (%.2f%%)  app log lines %d  tracebacks %d  marked down %d  "
                "call after: %s" % (library, kind, cpu, row["cpu_percent"], len(lines), tracebacks, len(downs),
                                    "served" if served else after))
            if row["cpu_percent"] >= 1.0:
                failures.append("%s check=%s: app used %.2f%% CPU" % (library, kind, row["cpu_percent"]))
            if tracebacks and not (kind == "tcp" and library in TCP_CHECK_TRACEBACKS):
                failures.append("%s check=%s: %d tracebacks in the app's log" % (library, kind, tracebacks))
            if not served:
                failures.append("%s check=%s: the call after the checks was not served: %s" % (library, kind, after))
            if downs:
                failures.append("%s check=%s: agiproxy took the healthy app down: %s" % (library, kind, downs[0]))
        finally:
            app.stop()
    return failures


def unhandled_check(library, argv, place, interpreter, program, results):
    """check = agi toward an app with no handler for check_path: the check must fail and take it down."""
    app_port = free_port()
    app = Child(argv + [str(app_port), SCRIPT], library, place, ready=listening(app_port))
    try:
        proxy = start_proxy(interpreter, program, place, app_port,
                            pool_keys="check = agi\ncheck_interval = 200ms\ncheck_timeout = 1\nfall = 2\n")
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(" is down" in l for l in proxy.lines()):
                time.sleep(0.1)
            downs = [l for l in proxy.lines() if " is down" in l]
        finally:
            proxy.stop()
    finally:
        app.stop()
    why = downs[0].split("last: ", 1)[-1] if downs else None
    results.append({"library": library, "check": "agi, no handler for check_path", "down": why})
    say("  %-18s check=agi, no handler for check_path: %s" % (library, "down: " + why if why else "STILL UP"))
    return [] if why else ["%s: check = agi kept an app with no handler for check_path up" % library]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libs", default=",".join(LIBRARIES), help="comma-separated, of: " + ", ".join(LIBRARIES))
    parser.add_argument("--check-seconds", type=float, default=15.0)
    parser.add_argument("--agiproxy", default=os.path.join(ROOT, "agiproxy.py"), help="the agiproxy.py to test")
    parser.add_argument("--pythons", default="3.6,3.13", help="agiproxy runs under each of these")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--cache", help="install into this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    started = time.monotonic()
    place = tempfile.mkdtemp(prefix="agiproxy-interop-")
    installs = args.cache or place
    os.makedirs(installs, exist_ok=True)
    failures, results, versions = [], {"cases": [], "checks": []}, {}
    proxies = []
    for version in args.pythons.split(","):
        interpreter = python(version)
        if not interpreter:
            failures.append("Python %s not found for agiproxy" % version)
        else:
            proxies.append((version, interpreter, os.path.abspath(args.agiproxy)))
    installer = Installer(installs)
    try:
        for library in args.libs.split(","):
            say("=== %s" % library)
            try:
                argv, versions[library] = installer.install(library)
            except RuntimeError as exc:
                say("  CANNOT INSTALL %s: %s" % (library, exc))
                failures.append("%s: cannot install: %s" % (library, exc))
                continue
            say("  installed: %s" % versions[library])
            try:
                failures += functional(library, argv, place, proxies, results["cases"])
                if proxies:
                    failures += checks(library, argv, place, proxies[-1][1], proxies[-1][2], args.check_seconds,
                                       results["checks"])
                    failures += unhandled_check(library, argv, place, proxies[-1][1], proxies[-1][2],
                                                results["checks"])
            except RuntimeError as exc:
                failures.append("%s: %s" % (library, exc))
                say("  ERROR %s" % exc)
    finally:
        shutil.rmtree(place, True)
    results["versions"], results["failures"] = versions, failures
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    for failure in failures:
        say("FAIL:", failure)
    say("interop: %d libraries in %.0fs" % (len(versions), time.monotonic() - started))
    passed = len(results["cases"]) + len(results["checks"]) - len(failures)
    # not the plain "N passed, N failed" line: in CI the unit suite's line stays the one that counts
    say("interop: %d cases and checks passed, %d failed" % (max(passed, 0), len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
