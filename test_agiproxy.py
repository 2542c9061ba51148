#!/usr/bin/env python3
"""Tests for agiproxy: real sockets on loopback, real threads, real TLS, real signals.

    python3 test_agiproxy.py            run everything (about a minute)
    python3 test_agiproxy.py -v Name    one class or test, verbosely

AGIPROXY_SOAK=1 adds the long fuzz and soak runs (``make test`` sets it for the
oldest and the newest interpreter only).  Standard library only, like agiproxy.
"""

import atexit
import codecs
import collections
import errno
import io
import json
import logging
import os
import queue
import random
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import urllib.error
import urllib.request

import agiproxy

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "agiproxy.py")
#: Upper bound for anything a test waits for.
TIMEOUT = 10.0
SOAK = os.environ.get("AGIPROXY_SOAK") == "1"
HAVE_IPV6 = socket.has_ipv6


def ipv6_works():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_IPV6 = HAVE_IPV6 and ipv6_works()


###############################################################################
# Helpers: waiting, logs, fake Asterisk, fake FastAGI servers #################
###############################################################################


def wait_until(predicate, timeout=TIMEOUT, message="condition"):
    """Poll *predicate* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %gs waiting for %s" % (timeout, message))
        time.sleep(0.002)


class LogRecorder(logging.Handler):
    """Keep agiproxy's log records so tests can assert on them."""

    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.records = []
        self.lock_ = threading.Lock()

    def emit(self, record):
        with self.lock_:
            self.records.append(record)

    def messages(self, level=logging.DEBUG):
        with self.lock_:
            return [r.getMessage() for r in self.records if r.levelno >= level]

    def clear(self):
        with self.lock_:
            self.records = []


LOG = LogRecorder()
agiproxy.log.addHandler(LOG)
agiproxy.log.setLevel(logging.DEBUG)
agiproxy.log.propagate = False


def make_config(text):
    return agiproxy.parse_config(textwrap.dedent(text), "<test>")


def read_header_bytes(sock, deadline):
    """Read up to the blank line; return (header bytes, rest)."""
    buffer = b""
    while agiproxy.header_end(buffer) < 0:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(65536)
        if not chunk:
            return buffer, b""
        buffer += chunk
    end = agiproxy.header_end(buffer)
    return buffer[:end], buffer[end:]


def close_listening(sock):
    """Close a test server's listening socket; shutdown() first, because close() alone does
    not wake a thread blocked in its accept() on Linux."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FakeServer(object):
    """A FastAGI server on loopback, serving each connection in its own thread.

    By default it reads the header, sends each command of *script* and reads one
    reply line for it, then closes.  *behaviour(conn, header, server)* replaces
    that.  ``headers`` and ``replies`` record what each session saw.
    """

    def __init__(self, script=("ANSWER", "GET VARIABLE CHANNEL"), behaviour=None, host="127.0.0.1",
                 tls_context=None, backlog=128, port=0):
        self.script = script
        self.behaviour = behaviour
        self.tls_context = tls_context
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.headers = []
        self.replies = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.release = threading.Event()      # for behaviours that hold a session
        self.before_header = None             # run on each connection before reading the header
        self.threads = []
        self.stopping = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def address(self):
        return agiproxy.format_address(self.host, self.port)

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn):
        try:
            if self.tls_context is not None:
                conn.settimeout(TIMEOUT)
                conn = self.tls_context.wrap_socket(conn, server_side=True)
            if self.before_header is not None:
                self.before_header(conn)
            header, rest = read_header_bytes(conn, time.monotonic() + TIMEOUT)
            with self.lock:
                self.headers.append(header)
            if self.behaviour is not None:
                self.behaviour(conn, header, self)
            else:
                self.run_script(conn, self.script, rest=rest)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def run_script(self, conn, script, before=None, rest=b""):
        """Send each command and record its reply (HANGUP lines skipped); *before(index)* runs first."""
        replies = []
        for index, command in enumerate(script):
            if before is not None:
                before(index)
            conn.sendall(command.encode() + b"\n")
            line, rest = agiproxy.read_line(conn, time.monotonic() + TIMEOUT, rest)
            while line == b"HANGUP\n":
                line, rest = agiproxy.read_line(conn, time.monotonic() + TIMEOUT, rest)
            replies.append(line)
        with self.lock:
            self.replies.append(replies)

    def stop(self):
        self.stopping = True
        self.release.set()
        close_listening(self.sock)
        for thread in self.threads:
            thread.join(TIMEOUT)


Transcript = collections.namedtuple("Transcript", "commands failed status")


def asterisk(port, header=None, host="127.0.0.1", tls_context=None, timeout=TIMEOUT, hangup_after=None,
             server_hostname=None):
    """Behave like Asterisk: send *header*, answer each command with 200, until the server closes.

    Returns the commands received, whether the session ended with FAILURE, and
    the value given to AGIPROXY_STATUS by SET VARIABLE, if any."""
    header = header or trace_header("a-plain")
    sock = socket.create_connection((host, port), timeout)
    if tls_context is not None:
        sock = tls_context.wrap_socket(sock, server_hostname=server_hostname or host)
    commands, failed, status = [], False, None
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(header)
        rest = b""
        while True:
            line, rest = agiproxy.read_line(sock, deadline, rest)
            if not line:
                break
            if line.lower().startswith(b"failure"):
                failed = True
                break
            commands.append(line.rstrip(b"\n"))
            match = re.match(rb"SET VARIABLE AGIPROXY_STATUS (\w+)", line)
            if match:
                status = match.group(1).decode()
            sock.sendall(b"200 result=1\n" if match else b"200 result=0\n")
            if hangup_after is not None and len(commands) == hangup_after:
                sock.sendall(b"HANGUP\n")
        try:
            sock.sendall(b"HANGUP\n")    # as Asterisk does once the script side has closed
        except OSError:
            pass
    finally:
        sock.close()
    return Transcript(commands, failed, status)


###############################################################################
# Real Asterisk traces ########################################################
###############################################################################

def parse_trace(text):
    """Return [(direction, bytes)] from a trace: 'A>S'/'S>A' chunks, b'' for <EOF>."""
    events = []
    for line in text.splitlines():
        match = re.match(r"^(?:\+[\d.]+)?\s+(A>S|S>A) (.*)$", line)
        if not match:
            continue
        direction, payload = match.groups()
        if payload == "<EOF>":
            events.append((direction, b""))
        else:
            data = codecs.decode(payload.encode("latin-1"), "unicode_escape").encode("latin-1")
            if events and events[-1][0] == direction and events[-1][1]:
                events[-1] = (direction, events[-1][1] + data)
            else:
                events.append((direction, data))
    return events


def trace_header(name):
    """The header bytes Asterisk sent in trace *name*."""
    return parse_trace(TRACES[name])[0][1]


def recv_exactly(sock, size, deadline):
    data = b""
    while len(data) < size:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def expect_eof(sock, deadline):
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def replay_side(sock, events, me, deadline):
    """Play one side of a trace over *sock*; return the mismatches seen (empty when byte-exact)."""
    problems = []
    for direction, data in events:
        mine = direction.startswith(me)
        if mine and data:
            sock.sendall(data)
        elif mine:
            if me == "S":
                sock.close()        # the FastAGI server closes: nothing after this reaches it
                return problems
            sock.shutdown(socket.SHUT_WR)
        elif data:
            got = recv_exactly(sock, len(data), deadline)
            if got != data:
                problems.append("%s expected %r, got %r" % (me, data, got))
                return problems
        else:
            if not expect_eof(sock, deadline):
                problems.append("%s expected EOF" % me)
            if me == "A":           # after the server's EOF Asterisk writes HANGUP; it must not matter
                try:
                    sock.sendall(b"HANGUP\n")
                except OSError:
                    pass
            return problems
    return problems


###############################################################################
# Pure logic: configuration ###################################################
###############################################################################

BASIC = """
    [agiproxy]
    listen = 127.0.0.1:0

    [pool main]
    servers = 127.0.0.1:%d

    [route all]
    path = *
    pool = main
"""


class ConfigTest(unittest.TestCase):

    def test_defaults(self):
        config = make_config("[agiproxy]\n")
        settings = config.settings
        self.assertEqual(settings.listen, [("127.0.0.1", 4573)])
        self.assertEqual(settings.backlog, 1024)
        self.assertEqual(settings.header_timeout, 5)
        self.assertEqual(settings.idle_timeout, 0)
        self.assertEqual(settings.failure_variable, "AGIPROXY_STATUS")
        self.assertFalse(settings.forwarded_for)
        self.assertEqual(config.routes, [])

    def test_listen_ipv4_and_ipv6(self):
        config = make_config("[agiproxy]\nlisten = 127.0.0.1:4573, [::1]:4574\n  0.0.0.0\n")
        self.assertEqual(config.settings.listen, [("127.0.0.1", 4573), ("::1", 4574), ("0.0.0.0", 4573)])

    def test_addresses(self):
        parse = agiproxy.parse_address
        self.assertEqual(parse("10.0.0.2"), ("10.0.0.2", 4573))
        self.assertEqual(parse("agi.example.com:4600"), ("agi.example.com", 4600))
        self.assertEqual(parse("[2001:db8::1]:5000"), ("2001:db8::1", 5000))
        self.assertEqual(parse("2001:db8::1"), ("2001:db8::1", 4573))
        for bad in ("host:port", "1.2.3.4:99999", "a b", "2001:db8::zz", "[::1]:x"):
            self.assertRaises(ValueError, parse, bad)

    def test_durations(self):
        self.assertEqual(agiproxy.parse_duration("500ms"), 0.5)
        self.assertEqual(agiproxy.parse_duration("2"), 2)
        self.assertEqual(agiproxy.parse_duration("1.5s"), 1.5)
        self.assertEqual(agiproxy.parse_duration("5m"), 300)
        self.assertRaises(ValueError, agiproxy.parse_duration, "soon")

    def test_server_lines(self):
        config = make_config("""
            [agiproxy]
            [pool billing]
            mode = least-sessions
            servers =
                10.0.0.1:4573 weight=2 max=100
                10.0.0.2              ; port defaults to 4573
                10.0.0.9:4573 backup  ; used only when no primary server can take the session
            [route billing]
            path = billing
            pool = billing
        """)
        servers = config.pools["billing"].servers
        self.assertEqual([(s.host, s.port, s.weight, s.max, s.backup) for s in servers],
                         [("10.0.0.1", 4573, 2, 100, False), ("10.0.0.2", 4573, 1, 0, False),
                          ("10.0.0.9", 4573, 1, 0, True)])

    def assertConfigError(self, text, *fragments):
        with self.assertRaises(agiproxy.ConfigError) as caught:
            make_config(text)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))
        return str(caught.exception)

    def test_errors_name_file_line_section_and_key(self):
        self.assertConfigError("[agiproxy]\nheader_timeout = soon\n",
                               "<test>:2: [agiproxy] header_timeout", "duration", "'soon'")
        self.assertConfigError("[agiproxy]\nlisen = 1.2.3.4\n", "<test>:2: [agiproxy] lisen", "unknown key")
        self.assertConfigError("[agiproxy]\n[pool a]\nservers = 1.2.3.4 wieght=2\n",
                               "<test>:3: [pool a] servers", "wieght=2")
        self.assertConfigError("[agiproxy]\n[pool a]\nmode = fastest\nservers = h\n", "[pool a] mode",
                               "failover, round-robin, least-sessions, hash")
        self.assertConfigError("[agiproxy]\n\n[route r]\npath = x\npool = nowhere\n",
                               "<test>:5: [route r] pool", "no section [pool nowhere]")
        self.assertConfigError("[agiproxy]\n[pool a]\nservers = h\n[route r]\npool = a\n", "[route r]",
                               "path = *")
        self.assertConfigError("[agiproxy]\n[route r]\nmatch = ^(unclosed\npool = a\n", "[route r] match",
                               "regular expression")
        self.assertConfigError("[agiproxy]\n[pool a]\nservers = h\n[route r]\nmatch = ^/(x)$\n"
                               "rewrite = /{2}\npool = a\n", "[route r] rewrite", "{2}")
        self.assertConfigError("[agiproxy]\n[listener x]\n", "unknown section")
        self.assertConfigError("[agiproxy]\n[agiproxy]\n", "<test>", "already exists")
        self.assertConfigError("no sections at all\n", "<test>")
        self.assertConfigError("[pool a]\nservers = h\n", "missing section [agiproxy]")

    def test_empty_values_need_one_where_empty_means_nothing(self):
        for section, key in (("agiproxy", "header_timeout"), ("agiproxy", "log_level"),
                             ("agiproxy", "failure_variable"), ("pool p", "mode"), ("pool p", "saturation")):
            text = "[agiproxy]\n[pool p]\nservers = h\n"
            text = text.replace("[%s]\n" % section, "[%s]\n%s =\n" % (section, key))
            self.assertConfigError(text, "[%s] %s: needs a value" % (section, key))
        make_config("[agiproxy]\nallow =\ntls_cert =\n[pool p]\nservers = h\non_saturation =\n")

    def test_missing_file_is_a_config_error(self):
        with self.assertRaises(agiproxy.ConfigError) as caught:
            agiproxy.load_config("/nonexistent/agiproxy.conf")
        self.assertIn("/nonexistent/agiproxy.conf", str(caught.exception))

    def test_sample_config_is_valid_and_documents_every_key(self):
        sample = os.path.join(HERE, "agiproxy.conf.sample")
        config = agiproxy.load_config(sample)
        self.assertTrue(config.routes)
        with open(sample) as handle:
            text = handle.read()
        for table in (agiproxy.GLOBAL_OPTIONS, agiproxy.POOL_OPTIONS, agiproxy.ROUTE_OPTIONS):
            for key, (_, default) in table.items():
                self.assertRegex(text, r"(?m)^[;#]?\s*%s\s*=" % re.escape(key), "%s not documented" % key)


###############################################################################
# Pure logic: header, URL, router, rewrite ####################################
###############################################################################


class HeaderTest(unittest.TestCase):

    def test_real_traces_parse(self):
        for name in TRACES:
            data = trace_header(name)
            header = agiproxy.AgiHeader.parse(data)
            self.assertEqual(header.encode(), data, name)     # forwarded byte for byte
            self.assertEqual(header.get("agi_network"), "yes")
            self.assertTrue(header.get("agi_request").startswith("agi://127.0.0.1:4600"), name)
        plain = agiproxy.AgiHeader.parse(trace_header("a-plain"))
        self.assertEqual(plain.get("agi_arg_2"), "beta gamma")
        self.assertEqual(plain.get("agi_accountcode"), "")
        self.assertNotIn("agi_network_script", agiproxy.AgiHeader.parse(trace_header("h-no-path")).variables)

    def test_header_end(self):
        self.assertEqual(agiproxy.header_end(b"agi_a: 1\nagi_b: 2\n\nHANGUP\n"), 19)
        self.assertEqual(agiproxy.header_end(b"agi_a: 1\r\nagi_b: 2\r\n\r\n"), 22)
        self.assertEqual(agiproxy.header_end(b"agi_a: 1\r\n\n"), 11)
        self.assertEqual(agiproxy.header_end(b"agi_a: 1\n"), -1)
        self.assertEqual(agiproxy.header_end(b"\n"), 1)

    def test_crlf_and_non_utf8_kept(self):
        data = b"agi_network: yes\r\nagi_request: agi://h/x\r\nagi_calleridname: J\xf6rg\r\n\r\n"
        header = agiproxy.AgiHeader.parse(data)
        self.assertEqual(header.get("agi_request"), "agi://h/x")
        self.assertEqual(header.encode(), data)
        self.assertEqual(agiproxy.encode(header.get("agi_calleridname")), b"J\xf6rg")
        rewritten = header.encode({"agi_request": "agi://h/y"})
        self.assertEqual(rewritten, data.replace(b"/x", b"/y"))

    def test_bad_last_line_is_rejected_in_linear_time(self):
        """A regex that could match a line two ways took 2**lines steps, holding the GIL:
        run it in a child so a regression fails here instead of hanging the suite."""
        code = ("import agiproxy\n"
                "data = b''.join(b'agi_v%d: x\\n' % n for n in range(200)) + b'bad line\\n\\n'\n"
                "try:\n    agiproxy.AgiHeader.parse(data)\nexcept agiproxy.HeaderError as exc:\n    print(exc)\n")
        out = subprocess.check_output([sys.executable, "-c", code], cwd=HERE, timeout=TIMEOUT)
        self.assertIn(b"malformed header line 201", out)

    def test_garbage_rejected(self):
        for bad in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"agi_x: 1\x00\n\n", b"no colon here\n\n",
                    b"\x16\x03\x01\x02\x00\n\n"):
            self.assertRaises(agiproxy.HeaderError, agiproxy.AgiHeader.parse, bad)

    def test_rewrite_inserts_network_script_before_request(self):
        header = agiproxy.AgiHeader.parse(trace_header("h-no-path"))
        out = header.encode({"agi_request": "agi://h/new", "agi_network_script": "new"}).split(b"\n")
        self.assertEqual(out[:3], [b"agi_network: yes", b"agi_network_script: new", b"agi_request: agi://h/new"])

    def test_append_goes_last(self):
        header = agiproxy.AgiHeader.parse(trace_header("a-plain"))
        out = header.encode(append=[("agi_x_fwd_for", "1.2.3.4:5")])
        self.assertTrue(out.endswith(b"agi_arg_2: beta gamma\nagi_x_fwd_for: 1.2.3.4:5\n\n"))


class RequestTest(unittest.TestCase):

    def test_parse(self):
        parse = agiproxy.parse_request
        self.assertEqual(parse("agi://127.0.0.1:4600/path/script?x=1&y=2"),
                         ("agi", "127.0.0.1", 4600, "/path/script", "x=1&y=2"))
        self.assertEqual(parse("hagi://billing/charge"), ("hagi", "billing", None, "/charge", ""))
        self.assertEqual(parse("agi://[2001:db8::5]:4573/x?q"), ("agi", "2001:db8::5", 4573, "/x", "q"))
        self.assertEqual(parse("agi://[::1]/"), ("agi", "::1", None, "/", ""))
        self.assertEqual(parse("AGI://host"), ("AGI", "host", None, "", ""))
        self.assertEqual(parse("agi://host?x=1"), ("agi", "host", None, "", "x=1"))
        for bad in ("http://host/x", "agi:/host", "/var/lib/asterisk/agi-bin/x.agi", "agi://a:b:c/"):
            self.assertRaises(ValueError, parse, bad)

    def test_script_and_url(self):
        request = agiproxy.parse_request("agi://127.0.0.1:4600/path/script?x=1&y=2")
        self.assertEqual(request.script, "path/script?x=1&y=2")   # as Asterisk writes agi_network_script
        self.assertEqual(request.url(), "agi://127.0.0.1:4600/path/script?x=1&y=2")
        self.assertEqual(request.url("[::1]:9"), "agi://[::1]:9/path/script?x=1&y=2")


def route_for(config, url, **variables):
    upstreams = agiproxy.Upstreams(config)
    variables.setdefault("agi_request", url)
    route, groups = upstreams.router.route(agiproxy.parse_request(url), variables)
    return route.name if route else None


ROUTES = """
    [agiproxy]
    [pool a]
    servers = 127.0.0.1:1
    [route billing]
    path = billing
    pool = a
    [route billing-eu]
    path = billing/eu
    pool = a
    [route slash]
    path = /ivr/
    pool = a
    [route any]
    path = *
    pool = a
"""


class RouterTest(unittest.TestCase):

    def test_path_semantics_of_agitator(self):
        config = make_config(ROUTES)
        self.assertEqual(route_for(config, "agi://p/billing"), "billing")
        self.assertEqual(route_for(config, "agi://p/billing/x/y?z=1"), "billing")
        self.assertEqual(route_for(config, "agi://p/billing/"), "billing")
        self.assertEqual(route_for(config, "agi://p/billing/eu/charge"), "billing-eu")   # longest wins
        self.assertEqual(route_for(config, "agi://p/billingx"), "any")       # whole segments only
        self.assertEqual(route_for(config, "agi://p/Billing"), "any")        # case-sensitive
        self.assertEqual(route_for(config, "agi://p/ivr/menu"), "slash")     # slashes in path = are optional
        self.assertEqual(route_for(config, "agi://p"), "any")

    def test_longest_path_wins_whatever_the_file_order(self):
        config = make_config(ROUTES.replace("[route billing]", "[route zz]"))
        self.assertEqual(route_for(config, "agi://p/billing/eu"), "billing-eu")

    def test_no_route(self):
        config = make_config(ROUTES.replace("path = *", "path = other"))
        self.assertIsNone(route_for(config, "agi://p/nothing"))

    def test_conditions_host_regex_variables_and_precedence(self):
        config = make_config(ROUTES + """
            [route pstn]
            agi_context = ^from-pstn$
            path = billing
            pool = a
            [route named]
            host = billing
            pool = a
            [route ivr]
            match = ^/ivr/(?P<lang>\\w+)/(\\d+)$
            pool = a
        """)
        # conditional routes are tried first, in file order, and beat longer paths
        self.assertEqual(route_for(config, "agi://p/billing/eu", agi_context="from-pstn"), "pstn")
        self.assertEqual(route_for(config, "agi://p/billing/eu", agi_context="internal"), "billing-eu")
        self.assertEqual(route_for(config, "agi://billing/x"), "named")
        self.assertEqual(route_for(config, "agi://BILLING:4573/x"), "named")
        self.assertEqual(route_for(config, "agi://p/ivr/en/42"), "ivr")
        self.assertEqual(route_for(config, "agi://p/ivr/en/x"), "slash")
        self.assertEqual(route_for(config, "agi://billing/billing", agi_context="from-pstn"), "pstn")

    def test_missing_variable_does_not_match(self):
        config = make_config("[agiproxy]\n[pool a]\nservers = h\n[route r]\nagi_x_custom = .*\npool = a\n")
        self.assertIsNone(route_for(config, "agi://p/x"))
        self.assertEqual(route_for(config, "agi://p/x", agi_x_custom=""), "r")

    def test_rewrite_templates(self):
        config = make_config("""
            [agiproxy]
            [pool a]
            servers = h
            [route ivr]
            match = ^/ivr/(?P<lang>\\w+)/(\\d+)$
            rewrite = /v2/{lang}/{2}?{query}&cid={agi_callerid}&p={path}&{{x}}
            pool = a
            [route plain]
            path = *
            rewrite = /fixed
            pool = a
        """)
        route = config.routes[0]
        request = agiproxy.parse_request("agi://p/ivr/de/42?a=1")
        groups = route.match(request, {"agi_callerid": "100"})
        self.assertEqual(route.rewritten(request, {"agi_callerid": "100"}, groups),
                         ("/v2/de/42", "a=1&cid=100&p=/ivr/de/42&{x}"))
        request = agiproxy.parse_request("agi://p/any?x=1")
        self.assertEqual(config.routes[1].rewritten(request, {}, {}), ("/fixed", ""))


###############################################################################
# Pure logic: balancing, max, backup, health ##################################
###############################################################################


def pool_of(servers, mode="failover", extra=""):
    config = make_config("[agiproxy]\n[pool p]\nmode = %s\n%s\nservers =\n    %s\n[route r]\npath = *\npool = p\n"
                         % (mode, extra, "\n    ".join(servers)))
    return agiproxy.Upstreams(config).pools["p"]


def pick(pool, variables=None, now=0.0):
    member, reason = pool.reserve(pool.order(variables or {}), [], now)
    return member.name if member else reason


class BalancingTest(unittest.TestCase):

    def distribution(self, pool, count, release=True, variables=None):
        counts = collections.Counter()
        for number in range(count):
            member, _ = pool.reserve(pool.order(variables(number) if variables else {}), [], 0.0)
            counts[member.name] += 1
            if release:
                member.state.active -= 1
        return counts

    def test_failover_always_first(self):
        pool = pool_of(["10.0.0.1", "10.0.0.2"])
        self.assertEqual(self.distribution(pool, 10), {"10.0.0.1:4573": 10})

    def test_round_robin_weights(self):
        pool = pool_of(["10.0.0.1 weight=2", "10.0.0.2", "10.0.0.3"], "round-robin")
        self.assertEqual(self.distribution(pool, 400), {"10.0.0.1:4573": 200, "10.0.0.2:4573": 100,
                                                         "10.0.0.3:4573": 100})
        order = [pick(pool) for _ in range(4)]     # smooth: never the same twice in a row here
        self.assertEqual(len(set(order[:2])), 2)

    def test_least_sessions(self):
        pool = pool_of(["10.0.0.1", "10.0.0.2 weight=2", "10.0.0.3"], "least-sessions")
        counts = self.distribution(pool, 400, release=False)     # sessions pile up
        self.assertEqual(counts, {"10.0.0.1:4573": 100, "10.0.0.2:4573": 200, "10.0.0.3:4573": 100})

    def test_hash_is_sticky_and_consistent(self):
        pool = pool_of(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], "hash")
        keys = ["call-%d" % n for n in range(2000)]
        first = {k: pick(pool, {"agi_uniqueid": k}) for k in keys}
        self.assertEqual(first, {k: pick(pool, {"agi_uniqueid": k}) for k in keys})   # sticky
        counts = collections.Counter(first.values())
        self.assertEqual(len(counts), 4)
        self.assertTrue(all(400 < n < 600 for n in counts.values()), counts)
        smaller = pool_of(["10.0.0.1", "10.0.0.2", "10.0.0.3"], "hash")
        moved = [k for k in keys if first[k] != "10.0.0.4:4573" and pick(smaller, {"agi_uniqueid": k}) != first[k]]
        self.assertEqual(moved, [])         # only the removed server's calls move

    def test_hash_on_another_variable(self):
        pool = pool_of(["10.0.0.1", "10.0.0.2", "10.0.0.3"], "hash", "hash = agi_callerid")
        picks = {pick(pool, {"agi_callerid": "555", "agi_uniqueid": str(n)}) for n in range(50)}
        self.assertEqual(len(picks), 1)

    def test_max_then_next_then_busy(self):
        pool = pool_of(["10.0.0.1 max=2", "10.0.0.2 max=1"])
        self.assertEqual([pick(pool) for _ in range(4)], ["10.0.0.1:4573", "10.0.0.1:4573", "10.0.0.2:4573", "BUSY"])

    def test_backup_only_when_no_primary_can(self):
        pool = pool_of(["10.0.0.1 max=1", "10.0.0.9 backup"], "round-robin")
        self.assertEqual(pick(pool), "10.0.0.1:4573")
        self.assertEqual(pick(pool), "10.0.0.9:4573")      # primary full
        pool.members[0].state.active = 0
        self.assertEqual(pick(pool), "10.0.0.1:4573")      # primary free again: back to it
        pool.members[0].state.mark_down(0.0, "test", 1, 30)
        pool.members[0].state.active = 0
        self.assertEqual(pick(pool, now=0.5), "10.0.0.9:4573")   # primary down

    def test_down_everywhere_is_noupstream(self):
        pool = pool_of(["10.0.0.1", "10.0.0.2"])
        for member in pool.members:
            member.state.mark_down(0.0, "test", 5, 30)
        self.assertEqual(pick(pool, now=1.0), "NOUPSTREAM")


class HealthStateTest(unittest.TestCase):

    def test_backoff_grows_to_cap_and_half_open_allows_one(self):
        state = agiproxy.ServerState("h", 1, False)
        self.assertTrue(state.mark_down(100.0, "refused", 1, 5))
        self.assertFalse(state.available(100.5, True))
        self.assertTrue(state.available(101.0, True))
        state.trial = True                                   # one session is trying
        self.assertFalse(state.available(101.0, True))
        self.assertFalse(state.mark_down(101.0, "refused", 1, 5))   # sent before it went down: same outage
        self.assertEqual((state.backoff, state.retry_at, state.trial), (1, 101.0, True))
        backoffs = []
        for _ in range(5):
            self.assertFalse(state.mark_down(200.0, "refused", 1, 5, trial=True))
            backoffs.append(state.backoff)
        self.assertEqual(backoffs, [2, 4, 5, 5, 5])
        self.assertFalse(state.available(1000.0, False))     # with active checks: no trials
        self.assertTrue(state.mark_up())
        self.assertTrue(state.available(0.0, False))


###############################################################################
# Sessions through a real proxy ###############################################
###############################################################################


class ProxyCase(unittest.TestCase):
    """Start servers and an in-process proxy on loopback; everything is stopped after the test."""

    def setUp(self):
        LOG.clear()

    def server(self, *args, **kwargs):
        server = FakeServer(*args, **kwargs)
        self.addCleanup(server.stop)
        return server

    def proxy(self, text, *servers):
        """Start a proxy for config *text* (``%d``/``%s`` filled with the servers' ports)."""
        text = textwrap.dedent(text)
        if servers:
            text = text % tuple(s.port for s in servers)
        proxy = agiproxy.Proxy(agiproxy.parse_config(text, "<test>"))
        proxy.bind()
        proxy.serve()
        self.addCleanup(proxy.shutdown)
        return proxy

    @staticmethod
    def port(proxy, index=0):
        return proxy.addresses[index][2]

    def assertIdle(self, proxy):
        """Every slot given back: no live session, no active count anywhere."""
        def idle():
            with proxy.lock:
                return not proxy.sessions and proxy.active == 0 and \
                    all(s.active == 0 for s in proxy.upstreams.states.values())
        wait_until(idle, message="sessions to end and counts to return to zero")


class SessionTest(ProxyCase):

    def test_end_to_end_header_byte_for_byte(self):
        upstream = self.server()
        proxy = self.proxy(BASIC, upstream)
        header = trace_header("a-plain")
        transcript = asterisk(self.port(proxy), header)
        self.assertEqual(transcript.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertFalse(transcript.failed)
        self.assertEqual(upstream.headers, [header])
        self.assertEqual(upstream.replies, [[b"200 result=0\n", b"200 result=0\n"]])
        self.assertIdle(proxy)
        # the header, two replies and the HANGUP Asterisk sends once the server has closed
        sizes = "bytes_up=%d bytes_down=28" % (len(header) + 26 + 7)
        wait_until(lambda: any(m.startswith("session client=127.0.0.1:") and 'end=COMPLETED why="upstream closed"' in m
                               and sizes in m for m in LOG.messages()), message="access log line")

    def test_many_concurrent_sessions(self):
        upstream = self.server()
        proxy = self.proxy(BASIC, upstream)
        results = []
        threads = [threading.Thread(target=lambda: results.append(asterisk(self.port(proxy))))
                   for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual(len(results), 40)
        self.assertTrue(all(r.commands == [b"ANSWER", b"GET VARIABLE CHANNEL"] for r in results))
        self.assertIdle(proxy)

    @unittest.skipUnless(HAVE_IPV6, "no IPv6 loopback")
    def test_ipv6_listener_and_upstream(self):
        upstream = self.server(host="::1")
        proxy = self.proxy("""
            [agiproxy]
            listen = [::1]:0, 127.0.0.1:0
            [pool main]
            servers = [::1]:%d
            [route all]
            path = *
            pool = main
        """, upstream)
        self.assertEqual(asterisk(self.port(proxy, 0), host="::1").commands[0], b"ANSWER")
        self.assertEqual(asterisk(self.port(proxy, 1)).commands[0], b"ANSWER")
        self.assertEqual(len(upstream.headers), 2)

    def test_forwarded_for_appends_to_the_chain(self):
        upstream = self.server()
        proxy = self.proxy(BASIC.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:0\nforwarded_for = yes"),
                           upstream)
        header = trace_header("a-plain")
        asterisk(self.port(proxy), header)
        chained = header[:-1] + b"agi_x_fwd_for: 10.1.1.1:5000\n\n"
        asterisk(self.port(proxy), chained)
        first, second = upstream.headers
        self.assertRegex(first, rb"agi_arg_2: beta gamma\nagi_x_fwd_for: 127\.0\.0\.1:\d+\n\n$")
        self.assertTrue(first.startswith(header[:-1]))
        self.assertRegex(second, rb"agi_x_fwd_for: 10\.1\.1\.1:5000, 127\.0\.0\.1:\d+\n\n$")
        self.assertEqual(second.count(b"agi_x_fwd_for"), 1)

    def test_rewrite_changes_request_and_network_script_only(self):
        upstream = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            servers = 127.0.0.1:%d
            [route ivr]
            match = ^/path/(?P<name>\\w+)$
            rewrite = /v2/{name}?{query}&cid={agi_callerid}
            pool = main
        """, upstream)
        header = trace_header("a-plain")
        asterisk(self.port(proxy), header)
        expected = header.replace(b"agi_network_script: path/script?x=1&y=2",
                                  b"agi_network_script: v2/script?x=1&y=2&cid=1001")
        expected = expected.replace(b"agi_request: agi://127.0.0.1:4600/path/script?x=1&y=2",
                                    b"agi_request: agi://127.0.0.1:4600/v2/script?x=1&y=2&cid=1001")
        self.assertEqual(upstream.headers, [expected])

    def test_rewrite_host_names_the_upstream(self):
        upstream = self.server()
        proxy = self.proxy(BASIC.replace("pool = main", "pool = main\nrewrite_host = yes"), upstream)
        header = trace_header("a-plain")
        asterisk(self.port(proxy), header)
        self.assertEqual(upstream.headers, [header.replace(b"agi://127.0.0.1:4600/",
                                                           b"agi://127.0.0.1:%d/" % upstream.port)])

    def test_hangup_and_520_blocks_pass_through(self):
        usage = b"520-Invalid command syntax.  Proper usage follows:\nSend the file.\n  <value>x</value>\n" \
                b"520 End of proper usage.\n"

        def behaviour(conn, header, server):
            conn.sendall(b"STREAM FILE\n")
            server.replies.append(recv_exactly(conn, len(usage) + 7, time.monotonic() + TIMEOUT))

        upstream = self.server(behaviour=behaviour)
        proxy = self.proxy(BASIC, upstream)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        with sock:
            sock.sendall(trace_header("a-plain"))
            self.assertEqual(recv_exactly(sock, 12, time.monotonic() + TIMEOUT), b"STREAM FILE\n")
            sock.sendall(b"HANGUP\n")
            sock.sendall(usage[:40])
            sock.sendall(usage[40:])
            self.assertTrue(expect_eof(sock, time.monotonic() + TIMEOUT))
        self.assertEqual(upstream.replies, [b"HANGUP\n" + usage])
        self.assertIdle(proxy)


class RelayTimerTest(ProxyCase):

    def test_ended_sessions_do_not_pile_up_in_the_timer_heap(self):
        upstream = self.server()
        proxy = self.proxy(BASIC.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:0\nmax_session_time = 1h"),
                           upstream)
        for _ in range(150):
            asterisk(self.port(proxy))
        self.assertIdle(proxy)
        self.assertLessEqual(len(proxy.relay.timers), 64 + 2)


class TraceReplayTest(ProxyCase):
    """Every real Asterisk capture, replayed through the proxy, arrives byte for byte."""

    def test_replay_all_traces(self):
        for name in sorted(TRACES):
            events = parse_trace(TRACES[name])
            problems = []
            upstream = self.server(behaviour=lambda conn, header, server, events=events: problems.extend(
                ["S header differs"] if header != events[0][1] else
                replay_side(conn, events[1:], "S", time.monotonic() + TIMEOUT)))
            proxy = self.proxy(BASIC, upstream)
            sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
            with sock:
                problems.extend(replay_side(sock, events, "A", time.monotonic() + TIMEOUT))
            wait_until(lambda: upstream.headers, message="the upstream to get the header")
            self.assertIdle(proxy)
            self.assertEqual(problems, [], name)


class FailurePathTest(ProxyCase):

    def test_noroute(self):
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            servers = 127.0.0.1:1
            [route billing]
            path = billing
            pool = main
        """)
        transcript = asterisk(self.port(proxy))
        self.assertEqual(transcript, ([b"SET VARIABLE AGIPROXY_STATUS NOROUTE"], True, "NOROUTE"))
        self.assertTrue(any("NOROUTE" in m for m in LOG.messages(logging.WARNING)))
        self.assertIdle(proxy)

    def test_noupstream_on_refused_connect_and_custom_variable(self):
        port = dead_port()
        proxy = self.proxy(BASIC.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:0\nfailure_variable = WHY")
                           % port)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        with sock:
            sock.sendall(trace_header("a-plain"))
            deadline = time.monotonic() + TIMEOUT
            line, rest = agiproxy.read_line(sock, deadline)
            self.assertEqual(line, b"SET VARIABLE WHY NOUPSTREAM\n")
            sock.sendall(b"HANGUP\n200 result=1\n")    # a HANGUP may come before the reply
            line, rest = agiproxy.read_line(sock, deadline, rest)
            self.assertEqual(line, b"FAILURE\n")
            self.assertTrue(expect_eof(sock, deadline))
        self.assertIdle(proxy)

    def test_busy_when_every_server_is_at_max(self):
        upstream = self.server(behaviour=lambda conn, header, server: server.release.wait(TIMEOUT))
        proxy = self.proxy(BASIC.replace("127.0.0.1:%d", "127.0.0.1:%d max=1"), upstream)
        holder = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        with holder:
            holder.sendall(trace_header("a-plain"))
            wait_until(lambda: upstream.headers, message="first session to hold the slot")
            self.assertEqual(asterisk(self.port(proxy)).status, "BUSY")
            upstream.release.set()
            self.assertTrue(expect_eof(holder, time.monotonic() + TIMEOUT))
        self.assertIdle(proxy)

    def test_client_gone_before_the_reply_is_quiet(self):
        proxy = self.proxy("[agiproxy]\nlisten = 127.0.0.1:0\n")
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
            sock.sendall(trace_header("a-plain"))
            sock.close()
        self.assertIdle(proxy)
        self.assertFalse([r for r in LOG.records if r.exc_info], "no traceback for a client that left")

    def test_header_without_agi_request_is_closed(self):
        proxy = self.proxy("[agiproxy]\nlisten = 127.0.0.1:0\n")
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        with sock:
            sock.sendall(b"agi_network: yes\nagi_channel: x\n\n")
            self.assertTrue(expect_eof(sock, time.monotonic() + TIMEOUT))
        wait_until(lambda: any("without agi_request" in m for m in LOG.messages()), message="log line")


class SessionEndTest(ProxyCase):
    """Whichever way a session ends, its slot comes back."""

    def run_session(self, behaviour, config_extra="", client=None):
        upstream = self.server(behaviour=behaviour)
        proxy = self.proxy(BASIC.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:0\n" + config_extra), upstream)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        sock.sendall(trace_header("a-plain"))
        wait_until(lambda: upstream.headers, message="upstream to get the header")
        if client:
            client(sock)
        else:
            expect_eof(sock, time.monotonic() + TIMEOUT)
        sock.close()
        self.assertIdle(proxy)
        return proxy

    def ended(self, text):
        wait_until(lambda: any(text in m for m in LOG.messages() if m.startswith("session ")),
                   message="access log with %r" % text)

    def test_upstream_closes(self):
        self.run_session(lambda conn, header, server: None)
        self.ended('end=COMPLETED why="upstream closed"')

    def test_upstream_resets(self):
        def reset(conn, header, server):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.run_session(reset)
        self.ended("upstream")

    def test_client_closes(self):
        self.run_session(lambda conn, header, server: server.release.wait(TIMEOUT), "fin_timeout = 300ms",
                         client=lambda sock: sock.shutdown(socket.SHUT_WR))
        self.ended('end=COMPLETED why="client closed, fin_timeout = 0.3s reached"')

    def test_client_resets(self):
        def reset(sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.run_session(lambda conn, header, server: server.release.wait(TIMEOUT), client=reset)
        self.ended("client")

    def test_idle_timeout(self):
        self.run_session(lambda conn, header, server: server.release.wait(TIMEOUT),
                         "idle_timeout = 200ms\nfin_timeout = 300ms")
        self.ended('end=TIMEOUT why="idle_timeout = 0.2s reached')

    def test_max_session_time_despite_traffic(self):
        def chatty(conn, header, server):
            while not server.release.wait(0.02):
                conn.sendall(b"NOOP\n")

        def answer(sock):
            while not expect_eof(sock, time.monotonic() + TIMEOUT):
                pass

        self.run_session(chatty, "max_session_time = 300ms\nfin_timeout = 300ms", client=answer)
        self.ended('end=TIMEOUT why="max_session_time = 0.3s reached')


#: Classic BPF: drop every packet.  On a server's accepted socket it makes that
#: server a vanished host: nothing the proxy sends is acknowledged or answered.
DROP_ALL = [(0x06, 0, 0, 0)]


def read_to_eof(conn, deadline):
    """Everything *conn* receives until its peer's FIN."""
    data = b""
    while True:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk


def half_closing_app(conn, header, server):
    """Sends two commands, shuts its write side, then reads the replies to their end."""
    conn.sendall(b"ANSWER\nSET VARIABLE X 1\n")
    conn.shutdown(socket.SHUT_WR)
    with server.lock:
        server.replies.append(read_to_eof(conn, time.monotonic() + TIMEOUT))


class RelayFaultTest(ProxyCase):
    """No byte lost, no failure hidden: half-closes, lingering closes, upstreams lost mid-call."""

    def proxy_for(self, upstream, extra=""):
        return self.proxy(BASIC.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:0\n" + extra), upstream)

    def access_line(self, fragment):
        wait_until(lambda: any(fragment in m for m in LOG.messages() if m.startswith("session ")),
                   message="an access line with %r" % fragment)

    def test_a_half_close_reaches_the_application_as_it_would_directly(self):
        upstream = self.server(behaviour=half_closing_app)
        direct = asterisk(upstream.port)
        wait_until(lambda: len(upstream.replies) == 1, message="the direct session's replies")
        proxy = self.proxy_for(upstream)
        proxied = asterisk(self.port(proxy))
        wait_until(lambda: len(upstream.replies) == 2, message="the proxied session's replies")
        self.assertEqual(upstream.replies[0], b"200 result=0\n200 result=0\nHANGUP\n")
        self.assertEqual(upstream.replies[1], upstream.replies[0])
        self.assertEqual(proxied, direct)
        self.assertIdle(proxy)

    def test_the_session_ends_without_a_reset_toward_asterisk(self):
        upstream = self.server()
        proxy = self.proxy_for(upstream)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(trace_header("a-plain"))
        deadline = time.monotonic() + TIMEOUT
        rest = b""
        for _ in SERVED:
            line, rest = agiproxy.read_line(sock, deadline, rest)
            sock.sendall(b"200 result=0\n")
        self.assertEqual(read_to_eof(sock, deadline), rest)
        sock.sendall(b"HANGUP\n")               # as Asterisk does after the script's end
        sock.shutdown(socket.SHUT_WR)
        self.access_line('end=COMPLETED why="upstream closed"')
        self.assertIdle(proxy)
        sock.settimeout(TIMEOUT)
        self.assertEqual(sock.recv(1), b"")     # a reset would raise ConnectionResetError here
        self.assertEqual(upstream.replies, [[b"200 result=0\n"] * 2])

    def test_an_upstream_reset_between_commands_tells_asterisk(self):
        def crash(conn, header, server):
            server.run_script(conn, ["ANSWER"])
            linger0(conn)
        upstream = self.server(behaviour=crash)
        proxy = self.proxy_for(upstream)
        self.assertEqual(asterisk(self.port(proxy)),
                         ([b"ANSWER", b"SET VARIABLE AGIPROXY_STATUS UPSTREAMLOST"], True, "UPSTREAMLOST"))
        self.access_line("end=UPSTREAMLOST")
        self.assertIdle(proxy)

    def failing_links(self, proxy):
        return [link for link in list(proxy.relay.links) if link.phase == agiproxy.Link.FAILING]

    def test_a_command_in_flight_is_answered_before_asterisk_is_told(self):
        crashed = threading.Event()

        def crash(conn, header, server):
            conn.sendall(b"GET VARIABLE X\n")
            linger0(conn)
            crashed.set()
        upstream = self.server(behaviour=crash)
        proxy = self.proxy_for(upstream)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(trace_header("a-plain"))
        deadline = time.monotonic() + TIMEOUT
        line, rest = agiproxy.read_line(sock, deadline)
        self.assertEqual(line, b"GET VARIABLE X\n")
        wait_until(crashed.is_set, message="the application to crash")
        wait_until(lambda: self.failing_links(proxy), message="the proxy to see the reset")
        sock.setblocking(False)
        self.assertRaises(BlockingIOError, sock.recv, 1)    # never pipelined before the answer
        sock.setblocking(True)
        sock.sendall(b"200 result=1 (x)\n")
        line, rest = agiproxy.read_line(sock, deadline, rest)
        self.assertEqual(line, b"SET VARIABLE AGIPROXY_STATUS UPSTREAMLOST\n")
        sock.sendall(b"200 result=1\n")
        line, rest = agiproxy.read_line(sock, deadline, rest)
        self.assertEqual(line, b"FAILURE\n")
        self.assertEqual(read_to_eof(sock, deadline), rest)
        sock.close()
        self.assertIdle(proxy)

    def vanishing_app(self, after_commands):
        """An application whose host vanishes (drops every packet) after *after_commands*."""
        def behaviour(conn, header, server):
            server.run_script(conn, after_commands)
            self.assertTrue(agiproxy.attach_filter(conn, DROP_ALL))
            if not after_commands:
                conn.sendall(b"GET VARIABLE X\n")   # in flight: the proxy writes the answer into the void
            server.release.wait(TIMEOUT)
        return behaviour

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs socket filters and TCP_KEEPIDLE")
    def test_a_vanished_host_is_found_by_keepalive_during_a_silent_call(self):
        upstream = self.server(behaviour=self.vanishing_app(["ANSWER"]))
        proxy = self.proxy_for(upstream, "tcp_keepalive_idle = 1\ntcp_keepalive_interval = 1\n"
                                         "tcp_keepalive_count = 1\ntcp_user_timeout = 0")
        started = time.monotonic()
        self.assertEqual(asterisk(self.port(proxy)),
                         ([b"ANSWER", b"SET VARIABLE AGIPROXY_STATUS UPSTREAMLOST"], True, "UPSTREAMLOST"))
        self.assertLess(time.monotonic() - started, 8)
        self.access_line("end=UPSTREAMLOST")
        self.assertIdle(proxy)

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs socket filters and TCP_USER_TIMEOUT")
    def test_an_unacknowledged_answer_is_found_by_the_user_timeout(self):
        upstream = self.server(behaviour=self.vanishing_app([]))
        proxy = self.proxy_for(upstream, "tcp_keepalive_idle = 0\ntcp_user_timeout = 1")
        started = time.monotonic()
        self.assertEqual(asterisk(self.port(proxy)),
                         ([b"GET VARIABLE X", b"SET VARIABLE AGIPROXY_STATUS UPSTREAMLOST"], True, "UPSTREAMLOST"))
        self.assertLess(time.monotonic() - started, 8)
        self.assertIdle(proxy)

    def test_report_lost_no_closes_as_1_0_did(self):
        def crash(conn, header, server):
            server.run_script(conn, ["ANSWER"])
            linger0(conn)
        upstream = self.server(behaviour=crash)
        proxy = self.proxy(BASIC.replace("servers =", "report_lost = no\nservers ="), upstream)
        self.assertEqual(asterisk(self.port(proxy)), ([b"ANSWER"], False, None))
        self.access_line("end=UPSTREAMLOST")
        self.assertIdle(proxy)

    def test_an_over_long_request_makes_a_bounded_log_line(self):
        upstream = self.server()
        proxy = self.proxy_for(upstream)
        url = b"agi://127.0.0.1/" + b"\xff" * 60000
        big = trace_header("a-plain").replace(b"agi_request: agi://127.0.0.1:4600/path/script?x=1&y=2",
                                              b"agi_request: " + url)
        self.assertIn(url, big)
        asterisk(self.port(proxy), big)
        self.assertIdle(proxy)
        lines = [m for m in LOG.messages() if m.startswith("session ")]
        self.assertTrue(lines)
        # LOG_TEXT_LIMIT characters, each escaped in at most 6 (\udcff): 3 KB, not 360 KB
        self.assertLess(max(len(m) for m in lines), 6 * agiproxy.LOG_TEXT_LIMIT + 400, lines[-1][:300])
        self.assertIn("more)", lines[-1])


SIGKILLED_APP = r"""
import socket, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
sys.stdout.write("%d\n" % listener.getsockname()[1])
sys.stdout.flush()
conn, _ = listener.accept()
data = b""
while b"\n\n" not in data:
    data += conn.recv(4096)
conn.sendall(b"GET VARIABLE X\n")
sys.stdout.write("sent\n")
sys.stdout.flush()
sys.stdin.read()        # until killed
"""


class KilledApplicationTest(ProxyCase):
    """A FastAGI process killed with a command in flight: its kernel sends a FIN, then
    resets Asterisk's answer.  The dialplan learns it (UPSTREAMLOST)."""

    def killed_session(self, extra=""):
        app = subprocess.Popen([sys.executable, "-c", SIGKILLED_APP], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(lambda: (app.poll() is None and app.kill(), app.wait(TIMEOUT), app.stdin.close(),
                                 app.stdout.close()))
        port = int(app.stdout.readline())
        proxy = self.proxy(BASIC.replace("servers =", extra + "\nservers =") % port)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(trace_header("a-plain"))
        deadline = time.monotonic() + TIMEOUT
        line, rest = agiproxy.read_line(sock, deadline)
        self.assertEqual(line, b"GET VARIABLE X\n")
        self.assertEqual(app.stdout.readline(), "sent\n")
        app.kill()
        app.wait(TIMEOUT)
        wait_until(lambda: any(link.phase == agiproxy.Link.FIN_IN_FLIGHT for link in list(proxy.relay.links)),
                   message="the proxy to see the FIN with a command in flight")
        sock.sendall(b"200 result=1 (x)\n")
        line, rest = agiproxy.read_line(sock, deadline, rest)
        self.assertEqual(line, b"SET VARIABLE AGIPROXY_STATUS UPSTREAMLOST\n")
        sock.sendall(b"200 result=1\n")
        tail = read_to_eof(sock, deadline)
        sock.close()
        self.assertIdle(proxy)
        return rest + tail

    def test_killed_with_a_command_in_flight_sets_the_status(self):
        self.assertEqual(self.killed_session(), b"")        # fin_in_flight = success: no FAILURE

    def test_fin_in_flight_failure_ends_with_failure(self):
        self.assertEqual(self.killed_session("fin_in_flight = failure"), b"FAILURE\n")


class FailoverTest(ProxyCase):

    def test_refused_server_is_skipped_and_remembered(self):
        upstream = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            retry_after = 60
            retry_after_max = 60
            servers =
                127.0.0.1:%d
                127.0.0.1:%d
            [route all]
            path = *
            pool = main
        """ % (dead_port(), upstream.port))
        for _ in range(5):
            self.assertEqual(asterisk(self.port(proxy)).commands[0], b"ANSWER")
        failures = [m for m in LOG.messages() if "connect failed" in m]
        self.assertEqual(len(failures), 1, failures)      # only the first session tried the dead one
        self.assertEqual(len(upstream.headers), 5)
        self.assertIdle(proxy)


###############################################################################
# Issue 3: pools that never make a caller wait ################################
###############################################################################


def dead_port(host="127.0.0.1"):
    """A port nothing listens on: connects to it are refused at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class BlackHole(object):
    """A listening socket that never accepts and whose backlog is full, so SYNs are dropped.

    A connect to it neither succeeds nor is refused: it times out.  The constructor
    checks that on this box and raises SkipTest when the kernel answers anyway."""

    def __init__(self, port=0, host="127.0.0.1"):
        self.host = host
        self.sock = socket.socket(socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(8):
            if self._connect_times_out():
                return
            filler = socket.socket(socket.AF_INET)
            filler.setblocking(False)
            filler.connect_ex((host, self.port))
            self.fillers.append(filler)
        self.close()
        raise unittest.SkipTest("cannot make a black-holed port on this box")

    def _connect_times_out(self):
        try:
            probe = socket.create_connection((self.host, self.port), 0.05)
        except socket.timeout:
            return True
        except OSError:
            return False
        self.fillers.append(probe)      # it sits in the backlog now: that fills it too
        return False

    def close(self):
        for sock in self.fillers + [self.sock]:
            agiproxy.close_quietly(sock)
        self.fillers = []


def close_listener(server):
    """Make FakeServer *server* refuse connects."""
    close_listening(server.sock)
    server.acceptor.join(TIMEOUT)


def reopen_listener(server):
    """Listen again on the same port as FakeServer *server* (after close_listener)."""
    sock = socket.socket(socket.AF_INET6 if ":" in server.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((server.host, server.port))
    sock.listen(128)
    server.sock = sock
    server.stopping = False
    server.acceptor = threading.Thread(target=server._accept, daemon=True)
    server.acceptor.start()


def header(path):
    """A complete Asterisk-like header for agi://127.0.0.1:4573/<path>."""
    return agiproxy.synthetic_header("agi://127.0.0.1:4573/" + path)


def drain(conn):
    """Read until EOF (the other side closed) or error."""
    conn.settimeout(TIMEOUT)
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass


def hold_or_answer(conn, header, server):
    """Hold a session whose request path contains /hold until the client closes; else one ANSWER."""
    if b"/hold" in header.split(b"agi_request:", 1)[-1].split(b"\n", 1)[0]:
        drain(conn)
    else:
        conn.sendall(b"ANSWER\n")
        agiproxy.read_line(conn, time.monotonic() + TIMEOUT)


def timed(port, header=None):
    started = time.monotonic()
    transcript = asterisk(port, header)
    return transcript, time.monotonic() - started


SERVED = [b"ANSWER", b"GET VARIABLE CHANNEL"]


class PoolCase(ProxyCase):
    """Helpers for pool tests: dead and black-holed ports, server state, held sessions."""

    def dead(self):
        return dead_port()

    def black_hole(self, port=0):
        hole = BlackHole(port)
        self.addCleanup(hole.close)
        return hole

    def closable(self, *args, **kwargs):
        """A FakeServer that the test may close and reopen on the same port."""
        server = self.server(*args, **kwargs)
        self.addCleanup(close_listener, server)
        return server

    def tempdir(self):
        path = tempfile.mkdtemp(prefix="agiproxy-h3-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    @staticmethod
    def state(proxy, port, host="127.0.0.1"):
        with proxy.lock:
            return proxy.upstreams.states[(host, port, False)]

    def hold(self, proxy, upstream, path="hold"):
        """Open a session that the upstream holds; return the client socket (close it to end)."""
        before = len(upstream.headers)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(header(path))
        wait_until(lambda: len(upstream.headers) > before, message="the upstream to get the held session")
        return sock

    @staticmethod
    def log_has(text):
        return any(text in m for m in LOG.messages())


class PoolPassiveHealthTest(PoolCase):
    """Items 1-3: a refused or black-holed server costs one session, then half-open trials."""

    def test_refused_server_costs_nothing_afterwards_even_for_a_burst(self):
        dead = self.dead()
        upstream = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            retry_after = 30
            servers =
                127.0.0.1:%d
                127.0.0.1:%d
            [route all]
            path = *
            pool = main
        """ % (dead, upstream.port))
        transcript, first = timed(self.port(proxy))
        self.assertEqual(transcript.commands, SERVED)
        state = self.state(proxy, dead)
        wait_until(lambda: not state.up, message="the refused server to be down")
        self.assertEqual(state.connect_failures, 1)
        self.assertIn("connect failed", state.why_down)
        results = []
        threads = [threading.Thread(target=lambda: results.append(timed(self.port(proxy))))
                   for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual(len(results), 10)
        self.assertTrue(all(t.commands == SERVED for t, _ in results), results)
        self.assertEqual(state.connect_failures, 1, "a session after the first tried the refused server")
        self.assertLess(max(elapsed for _, elapsed in results), 1.0)
        self.assertEqual(len(upstream.headers), 11)
        self.assertIdle(proxy)

    def test_black_hole_costs_one_connect_timeout_in_total(self):
        hole = self.black_hole()
        upstream = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            connect_timeout = 500ms
            [pool main]
            retry_after = 5
            servers =
                127.0.0.1:%d
                127.0.0.1:%d
            [route all]
            path = *
            pool = main
        """ % (hole.port, upstream.port))
        times = []
        for _ in range(6):
            transcript, elapsed = timed(self.port(proxy))
            self.assertEqual(transcript.commands, SERVED)
            times.append(elapsed)
        self.assertGreaterEqual(times[0], 0.45, times)          # the first session paid connect_timeout...
        self.assertLess(times[0], 1.5, times)
        self.assertLess(sum(times[1:]), 0.5, times)             # ...and nobody after it
        self.assertLess(sum(times), 0.5 + 1.0, times)
        state = self.state(proxy, hole.port)
        self.assertFalse(state.up)
        self.assertEqual(state.connect_failures, 1)
        self.assertEqual(state.why_down, "connect failed: timed out")
        self.assertEqual(len(upstream.headers), 6)
        self.assertTrue(self.log_has("server 127.0.0.1:%d of pool main is down: connect failed: timed out"
                                     % hole.port))
        self.assertIdle(proxy)

    def test_half_open_trial_backoff_doubles_and_success_brings_it_back(self):
        revived = self.closable()
        close_listener(revived)                    # refused from now on
        port = revived.port
        upstream = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            connect_timeout = 400ms
            [pool main]
            retry_after = 200ms
            retry_after_max = 5
            servers =
                127.0.0.1:%d
                127.0.0.1:%d
            [route all]
            path = *
            pool = main
        """ % (port, upstream.port))
        state = self.state(proxy, port)
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        self.assertEqual((state.up, state.backoff, state.connect_failures), (False, 0.2, 1))
        retry_at = state.retry_at
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)      # within the back-off
        self.assertLess(time.monotonic(), retry_at, "test too slow to tell")
        self.assertEqual(state.connect_failures, 1)
        # After the back-off one session tries it (still refused): the back-off doubles.
        wait_until(lambda: time.monotonic() >= state.retry_at, message="retry_after to pass")
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        self.assertEqual((state.up, state.backoff, state.connect_failures), (False, 0.4, 2))
        # Now it black-holes: exactly one session is the trial; the others go on meanwhile.
        hole = self.black_hole(port)
        wait_until(lambda: time.monotonic() >= state.retry_at, message="the doubled back-off to pass")
        trial = []
        thread = threading.Thread(target=lambda: trial.append(timed(self.port(proxy))))
        thread.start()
        wait_until(lambda: state.trial, timeout=0.3, message="a session to start the half-open trial")
        others = [timed(self.port(proxy)) for _ in range(3)]
        still_trying = state.trial
        thread.join(TIMEOUT)
        self.assertTrue(still_trying, "the trial should still be connecting while the others were served")
        self.assertTrue(all(t.commands == SERVED and e < 0.3 for t, e in others), others)
        self.assertEqual(trial[0][0].commands, SERVED)
        self.assertGreaterEqual(trial[0][1], 0.35)
        self.assertEqual((state.up, state.backoff, state.connect_failures), (False, 0.8, 3))
        # It comes back: the next trial succeeds and marks it up; sessions return to it.
        hole.close()
        reopen_listener(revived)
        served_before = len(upstream.headers)
        wait_until(lambda: time.monotonic() >= state.retry_at, message="the back-off to pass again")
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        self.assertEqual((state.up, state.backoff, state.trial, state.why_down), (True, 0.0, False, ""))
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        self.assertEqual(len(revived.headers), 2)
        self.assertEqual(len(upstream.headers), served_before)
        self.assertTrue(self.log_has("server 127.0.0.1:%d of pool main is up again" % port))
        self.assertIdle(proxy)

    def test_a_burst_of_failures_from_one_outage_is_one_backoff_step(self):
        """Sessions that reserved the server before it was known down are not failed trials:
        they should not double the back-off (retry_after 0.2 s must not become 1.6 s)."""
        hole = self.black_hole()
        upstream = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            connect_timeout = 400ms
            [pool main]
            retry_after = 200ms
            retry_after_max = 10
            servers =
                127.0.0.1:%d
                127.0.0.1:%d
            [route all]
            path = *
            pool = main
        """ % (hole.port, upstream.port))
        state = self.state(proxy, hole.port)
        results = []
        threads = [threading.Thread(target=lambda: results.append(asterisk(self.port(proxy)))) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: state.active == 4, timeout=0.35, message="4 sessions connecting to the black hole")
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual([r.commands for r in results], [SERVED] * 4)
        self.assertEqual(state.connect_failures, 4)
        self.assertFalse(state.up)
        self.assertEqual(state.backoff, 0.2, "one outage seen by 4 sessions at once escalated the back-off")


class PoolBackupTest(PoolCase):
    """Item 4: backups take the sessions while the primaries are down, and give them back."""

    def test_backup_in_and_back_out(self):
        first, second = self.closable(), self.closable()
        close_listener(first)
        close_listener(second)
        backup = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            mode = round-robin
            retry_after = 200ms
            retry_after_max = 200ms
            servers =
                127.0.0.1:%d
                127.0.0.1:%d
                127.0.0.1:%d backup
            [route all]
            path = *
            pool = main
        """ % (first.port, second.port, backup.port))
        for _ in range(4):
            self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        states = [self.state(proxy, s.port) for s in (first, second)]
        self.assertEqual([(s.up, s.connect_failures) for s in states], [(False, 1), (False, 1)])
        self.assertEqual(len(backup.headers), 4)
        reopen_listener(first)
        reopen_listener(second)
        wait_until(lambda: all(time.monotonic() >= s.retry_at for s in states), message="the back-off to pass")
        for _ in range(6):
            self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        self.assertEqual([s.up for s in states], [True, True])
        self.assertEqual(len(backup.headers), 4, "the backup still got sessions after the primaries came back")
        self.assertEqual((len(first.headers), len(second.headers)), (3, 3))
        self.assertIdle(proxy)


class PoolBusyTest(PoolCase):
    """Item 5: BUSY and NOUPSTREAM as the dialplan sees them."""

    def test_global_max_sessions_gives_busy(self):
        upstream = self.server(behaviour=hold_or_answer)
        proxy = self.proxy(BASIC.replace("listen = 127.0.0.1:0", "listen = 127.0.0.1:0\nmax_sessions = 1"),
                           upstream)
        holder = self.hold(proxy, upstream)
        transcript = asterisk(self.port(proxy), header("x"))
        self.assertEqual(transcript, ([b"SET VARIABLE AGIPROXY_STATUS BUSY"], True, "BUSY"))
        self.assertEqual(len(upstream.headers), 1)
        holder.close()
        self.assertIdle(proxy)
        self.assertEqual(asterisk(self.port(proxy), header("x")).commands, [b"ANSWER"])

    def test_down_plus_full_is_busy_not_noupstream(self):
        dead = self.dead()
        upstream = self.server(behaviour=hold_or_answer)
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            retry_after = 30
            servers =
                127.0.0.1:%d
                127.0.0.1:%d max=1
            [route all]
            path = *
            pool = main
        """ % (dead, upstream.port))
        holder = self.hold(proxy, upstream)           # marks the dead one down on the way
        self.assertFalse(self.state(proxy, dead).up)
        self.assertEqual(asterisk(self.port(proxy), header("x")).status, "BUSY")
        holder.close()
        self.assertIdle(proxy)
        self.assertEqual(asterisk(self.port(proxy), header("x")).commands, [b"ANSWER"])
        self.assertEqual(self.state(proxy, dead).connect_failures, 1)

    def test_noupstream_without_a_connect_while_the_only_server_is_down(self):
        dead = self.dead()
        proxy = self.proxy((BASIC % dead).replace("servers", "retry_after = 30\nservers"))
        first = asterisk(self.port(proxy))
        second, elapsed = timed(self.port(proxy))
        for transcript in (first, second):
            self.assertEqual(transcript, ([b"SET VARIABLE AGIPROXY_STATUS NOUPSTREAM"], True, "NOUPSTREAM"))
        self.assertEqual(self.state(proxy, dead).connect_failures, 1)
        self.assertLess(elapsed, 0.5)
        self.assertTrue(self.log_has("pool main: every server is down"))
        self.assertIdle(proxy)


class CheckRecorder(object):
    """Wrap proxy.check_result to record (passed, up after) for one server, in order."""

    def __init__(self, proxy, port):
        self.events = []
        self.lock = threading.Lock()
        original = proxy.check_result

        def recording(pool, member, why):
            original(pool, member, why)
            if member.state.port == port:
                with self.lock:
                    self.events.append((why is None, member.state.up))

        proxy.check_result = recording

    def snapshot(self):
        with self.lock:
            return list(self.events)

    def streak_before_flip(self, start, up):
        """Checks in a row (all of one result) that led to the first state *up* at or after *start*."""
        events = self.snapshot()
        index = next(i for i in range(start, len(events)) if events[i][1] == up)
        passed = events[index][0]
        first = index
        while first > 0 and events[first - 1][0] == passed:
            first -= 1
        before = events[first:index]
        return index - first + 1, passed, all(e[1] != up for e in before)


class PoolActiveCheckTest(PoolCase):
    """Item 6: check = tcp and check = agi with rise/fall; checks end with the proxy."""

    CONFIG = """
        [agiproxy]
        listen = 127.0.0.1:0
        [pool main]
        check = %s
        check_path = /h3/health
        check_interval = 50ms
        check_timeout = 150ms
        rise = 2
        fall = 3
        retry_after = 50ms
        servers = 127.0.0.1:%d
        [route all]
        path = *
        pool = main
    """

    def test_tcp_check_fall_then_rise(self):
        upstream = self.closable()
        proxy = self.proxy(self.CONFIG % ("tcp", upstream.port))
        recorder = CheckRecorder(proxy, upstream.port)
        state = self.state(proxy, upstream.port)
        wait_until(lambda: len(recorder.snapshot()) >= 2, message="two checks")
        self.assertTrue(all(e == (True, True) for e in recorder.snapshot()))
        start = len(recorder.snapshot())
        close_listener(upstream)
        wait_until(lambda: not state.up, message="fall = 3 failed checks")
        self.assertEqual(recorder.streak_before_flip(start, False), (3, False, True))
        self.assertIn("3 checks failed", state.why_down)
        wait_until(lambda: time.monotonic() >= state.retry_at, message="retry_after to pass")
        self.assertEqual(asterisk(self.port(proxy)).status, "NOUPSTREAM")    # checks decide: no trial
        self.assertEqual(state.connect_failures, 0)
        start = len(recorder.snapshot())
        reopen_listener(upstream)
        wait_until(lambda: state.up, message="rise = 2 passed checks")
        self.assertEqual(recorder.streak_before_flip(start, True), (2, True, True))
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        self.assertIdle(proxy)

    def test_agi_check_header_fall_rise_and_stop_at_shutdown(self):
        healthy = threading.Event()
        healthy.set()

        def behaviour(conn, header, server):
            if b"agi_network_script: h3/health\n" not in header:
                hold_or_answer(conn, header, server)
            elif healthy.is_set():
                conn.sendall(b"NOOP\n")
                drain(conn)
            else:
                drain(conn)      # never says anything: the check times out and closes

        upstream = self.server(behaviour=behaviour)
        proxy = self.proxy(self.CONFIG % ("agi", upstream.port))
        recorder = CheckRecorder(proxy, upstream.port)
        state = self.state(proxy, upstream.port)
        wait_until(lambda: len(recorder.snapshot()) >= 2, message="two checks")
        check = upstream.headers[0]
        self.assertTrue(check.startswith(b"agi_network: yes\n"), check)
        self.assertTrue(check.endswith(b"\n\n"), check)
        self.assertEqual(agiproxy.header_end(check), len(check))
        parsed = agiproxy.AgiHeader.parse(check)
        self.assertEqual(parsed.get("agi_network_script"), "h3/health")
        self.assertEqual(parsed.get("agi_request"), "agi://127.0.0.1:%d/h3/health" % upstream.port)
        self.assertTrue(parsed.get("agi_request").endswith("/h3/health"))
        self.assertTrue(all(e == (True, True) for e in recorder.snapshot()))
        start = len(recorder.snapshot())
        healthy.clear()
        wait_until(lambda: not state.up, message="fall = 3 silent checks")
        self.assertEqual(recorder.streak_before_flip(start, False), (3, False, True))
        self.assertIn("timed out", state.why_down)
        self.assertEqual(asterisk(self.port(proxy), header("x")).status, "NOUPSTREAM")
        start = len(recorder.snapshot())
        healthy.set()
        wait_until(lambda: state.up, message="rise = 2 passing checks")
        self.assertEqual(recorder.streak_before_flip(start, True), (2, True, True))
        self.assertEqual(asterisk(self.port(proxy), header("x")).commands, [b"ANSWER"])
        checkers = list(proxy.checkers)
        self.assertEqual(len(checkers), 1)
        self.assertTrue(checkers[0].is_alive())
        proxy.shutdown()
        self.assertFalse(checkers[0].is_alive(), "the check thread outlived proxy.shutdown()")
        self.assertEqual(proxy.checkers, [])
        count = len(recorder.snapshot())
        checkers[0].join(0.2)
        self.assertEqual(len(recorder.snapshot()), count)


class PoolConnectBudgetTest(PoolCase):
    """Item 7: black-holed servers cost at most connect_budget, not N x connect_timeout."""

    def test_budget_caps_the_wait_for_noupstream(self):
        holes = [self.black_hole() for _ in range(5)]
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            connect_timeout = 400ms
            connect_budget = 600ms
            [pool main]
            servers =
                %s
            [route all]
            path = *
            pool = main
        """ % "\n                ".join("127.0.0.1:%d" % h.port for h in holes))
        transcript, elapsed = timed(self.port(proxy))
        self.assertEqual(transcript, ([b"SET VARIABLE AGIPROXY_STATUS NOUPSTREAM"], True, "NOUPSTREAM"))
        self.assertGreater(elapsed, 0.55)
        self.assertLess(elapsed, 0.6 + 1.0)            # 5 x 0.4 s would be 2 s
        failures = [self.state(proxy, h.port).connect_failures for h in holes]
        self.assertEqual(failures, [1, 1, 0, 0, 0])
        self.assertTrue(self.log_has("connect_budget = 0.6s spent"))
        self.assertIdle(proxy)


#: What the client sees of a session whose application reset before its first command.
LOST = ([b"SET VARIABLE AGIPROXY_STATUS UPSTREAMLOST"], True, "UPSTREAMLOST")


def reset_after_header(conn, header, server):
    """A crashed application behind a live port: it reads the header and resets."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class PoolEarlyCloseTest(PoolCase):
    """Item 8: a live port whose application closes before any command is taken out."""

    POOL = """
        [agiproxy]
        listen = 127.0.0.1:0
        [pool main]
        early_close_limit = %d
        retry_after = %s
        retry_after_max = 60
        servers =
            127.0.0.1:%d
            127.0.0.1:%d
        [route all]
        path = *
        pool = main
    """

    def test_marked_down_after_early_close_limit(self):
        bad = self.server(behaviour=reset_after_header)
        good = self.server()
        proxy = self.proxy(self.POOL % (3, "30", bad.port, good.port))
        state = self.state(proxy, bad.port)
        for number in range(1, 4):
            self.assertEqual(asterisk(self.port(proxy)), LOST)
            self.assertIdle(proxy)
            self.assertEqual(state.up, number < 3)
            self.assertEqual(state.early_closes, number % 3)
        self.assertEqual(state.why_down, "ended 3 sessions in a row without a command")
        for _ in range(2):
            self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        self.assertEqual((len(bad.headers), len(good.headers)), (3, 2))

    def test_a_clean_close_after_the_header_is_a_working_application(self):
        """Issue 9: 'log the call and go' (Asterisk reports SUCCESS, trace g) is never taken out."""
        header_only = self.server(behaviour=lambda conn, header, server: None)
        good = self.server()
        proxy = self.proxy(self.POOL % (3, "30", header_only.port, good.port))
        state = self.state(proxy, header_only.port)
        for _ in range(6):
            self.assertEqual(asterisk(self.port(proxy)), ([], False, None))
            self.assertIdle(proxy)
            self.assertEqual((state.up, state.early_closes), (True, 0))
        self.assertEqual((len(header_only.headers), len(good.headers)), (6, 0))

    def test_a_close_before_the_whole_header_was_read_counts(self):
        """A server that closes without reading the header is broken, though the kernel took
        the whole header: its FIN comes with header bytes unacknowledged, or a reset."""
        def close_at_once(conn):
            conn.close()
        bad = self.server(behaviour=lambda conn, header, server: None)
        bad.before_header = close_at_once
        good = self.server()
        proxy = self.proxy(self.POOL % (2, "30", bad.port, good.port))
        state = self.state(proxy, bad.port)
        big = header("x") .replace(b"\n\n", b"\n" + b"".join(b"agi_arg_%d: %s\n" % (n, b"y" * 4000)
                                                                for n in range(1, 16)) + b"\n")
        for _ in range(2):
            asterisk(self.port(proxy), big)
            self.assertIdle(proxy)
        self.assertFalse(state.up)
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)

    def test_a_command_resets_the_count(self):
        plan = ["close", "close", "answer", "close", "close", "close"]

        def behaviour(conn, header, server):
            if plan.pop(0) == "answer":
                conn.sendall(b"ANSWER\n")
                agiproxy.read_line(conn, time.monotonic() + TIMEOUT)
            else:
                reset_after_header(conn, header, server)

        flaky = self.server(behaviour=behaviour)
        good = self.server()
        proxy = self.proxy(self.POOL % (3, "30", flaky.port, good.port))
        state = self.state(proxy, flaky.port)
        counts = []
        for _ in range(5):
            asterisk(self.port(proxy))
            self.assertIdle(proxy)
            counts.append((state.up, state.early_closes))
        self.assertEqual(counts, [(True, 1), (True, 2), (True, 0), (True, 1), (True, 2)])
        asterisk(self.port(proxy))
        self.assertIdle(proxy)
        self.assertFalse(state.up)
        self.assertEqual(len(flaky.headers), 6)

    def test_an_early_closing_trial_keeps_it_down_and_doubles_the_backoff(self):
        """The half-open trial of a server taken out for early closes 'succeeds' at TCP level;
        the session it then ruins must count as a failed trial, not bring it back for
        early_close_limit more ruined calls with the back-off reset."""
        bad = self.server(behaviour=reset_after_header)
        good = self.server()
        proxy = self.proxy(self.POOL % (2, "200ms", bad.port, good.port))
        state = self.state(proxy, bad.port)
        for _ in range(2):
            asterisk(self.port(proxy))
            self.assertIdle(proxy)
        self.assertFalse(state.up)
        wait_until(lambda: time.monotonic() >= state.retry_at, message="retry_after to pass")
        self.assertEqual(asterisk(self.port(proxy)), LOST)          # the trial: reset again
        self.assertIdle(proxy)
        self.assertEqual(len(bad.headers), 3)
        after = asterisk(self.port(proxy))
        self.assertIdle(proxy)
        self.assertEqual((len(bad.headers), len(good.headers)), (3, 1),
                         "the session after a failed early-close trial went to the bad server again")
        self.assertEqual(after.commands, SERVED)
        self.assertFalse(state.up)
        self.assertEqual(state.backoff, 0.4)


class PoolHookTest(PoolCase):
    """Item 9: on_saturation/on_recovery fire once per saturation_interval; a hung hook is killed."""

    def hook_script(self, body):
        path = os.path.join(self.tempdir(), "hook.sh")
        with open(path, "w") as handle:
            handle.write("#!/bin/sh\n" + body + "\n")
        os.chmod(path, stat.S_IRWXU)
        return path

    def lines(self, path):
        try:
            with open(path) as handle:
                return handle.read().splitlines()
        except IOError:
            return []

    def test_saturation_and_recovery_once_per_interval(self):
        out = os.path.join(self.tempdir(), "calls")
        script = self.hook_script('echo "$@" >> %s' % out)
        upstream = self.server(behaviour=hold_or_answer)
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            saturation = 0.5
            saturation_interval = 600ms
            on_saturation = %s sat {pool} {active} {capacity}
            on_recovery = %s rec {pool} {active} {capacity}
            hook_timeout = 5
            servers = 127.0.0.1:%d max=4
            [route all]
            path = *
            pool = main
        """ % (script, script, upstream.port))
        with proxy.lock:
            pool = proxy.upstreams.pools["main"]
        first = self.hold(proxy, upstream)
        self.assertEqual(self.lines(out), [])                                  # 1/4 is below 0.5
        second = self.hold(proxy, upstream)
        wait_until(lambda: self.lines(out) == ["sat main 2 4"], message="on_saturation")
        fired_at = pool.state.saturation_hook_at
        second.close()
        wait_until(lambda: self.lines(out) == ["sat main 2 4", "rec main 1 4"], message="on_recovery")
        second = self.hold(proxy, upstream)                                    # saturated again, too soon
        self.assertLess(time.monotonic() - fired_at, 0.6, "test too slow to tell")
        with proxy.lock:
            self.assertEqual((pool.state.saturated, pool.state.saturation_hook_at), (False, fired_at))
        second.close()
        self.wait_pool_active(proxy, pool, 1)
        wait_until(lambda: time.monotonic() - fired_at >= 0.6, message="saturation_interval to pass")
        second = self.hold(proxy, upstream)
        wait_until(lambda: len(self.lines(out)) == 3, message="on_saturation after the interval")
        second.close()
        first.close()
        wait_until(lambda: len(self.lines(out)) == 4, message="on_recovery again")
        self.assertEqual(self.lines(out), ["sat main 2 4", "rec main 1 4", "sat main 2 4", "rec main 1 4"])
        self.assertIdle(proxy)
        self.assertTrue(self.log_has("on_saturation hook %s sat main 2 4 done" % script))

    def wait_pool_active(self, proxy, pool, active):
        wait_until(lambda: pool.active == active, message="pool active back to %d" % active)

    def test_hung_hook_does_not_block_sessions_and_is_killed(self):
        pidfile = os.path.join(self.tempdir(), "pid")
        script = self.hook_script("echo $$ > %s\nexec sleep 30" % pidfile)
        upstream = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            saturation = 0.5
            on_saturation = %s {pool}
            hook_timeout = 300ms
            servers = 127.0.0.1:%d max=2
            [route all]
            path = *
            pool = main
        """ % (script, upstream.port))
        transcript, elapsed = timed(self.port(proxy))           # 1/2: saturated, the hook hangs
        self.assertEqual(transcript.commands, SERVED)
        self.assertLess(elapsed, 0.25)
        pid = int(wait_until(lambda: "".join(self.lines(pidfile)).strip(), message="the hook to start"))
        for _ in range(3):
            self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        wait_until(lambda: self.log_has("on_saturation hook %s still running after 0.3s: killed" % script),
                   timeout=3, message="the hung hook to be killed")

        def gone():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(gone, timeout=2, message="the hook process to be gone")
        self.assertIdle(proxy)

    def test_recovery_fires_when_the_saturating_session_fails_to_connect(self):
        """on_saturation fired for a slot taken on a dead server; once that slot is given
        back (NOUPSTREAM) the pool is idle again, so on_recovery is due."""
        out = os.path.join(self.tempdir(), "calls")
        script = self.hook_script('echo "$@" >> %s' % out)
        dead = self.dead()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            saturation = 0.5
            on_saturation = %s sat {active}
            on_recovery = %s rec {active}
            servers = 127.0.0.1:%d max=2
            [route all]
            path = *
            pool = main
        """ % (script, script, dead))
        self.assertEqual(asterisk(self.port(proxy)).status, "NOUPSTREAM")
        self.assertIdle(proxy)
        wait_until(lambda: self.lines(out)[:1] == ["sat 1"], message="on_saturation")
        with proxy.lock:
            saturated = proxy.upstreams.pools["main"].state.saturated
        self.assertFalse(saturated, "pool still flagged saturated with no session left")
        wait_until(lambda: self.lines(out) == ["sat 1", "rec 0"], timeout=2, message="on_recovery")


class PoolReloadStateTest(PoolCase):
    """Item 10: a reload keeps each surviving server's ServerState (counts and health)."""

    CONFIG = """
        [agiproxy]
        listen = 127.0.0.1:0
        [pool main]
        retry_after = 30
        servers =
            127.0.0.1:%d
            127.0.0.1:%d
            %s
        [route all]
        path = *
        pool = main
    """

    def test_states_survive_and_new_servers_start_fresh(self):
        dead = self.dead()
        upstream = self.server(behaviour=hold_or_answer)
        extra = self.server(behaviour=hold_or_answer)
        proxy = self.proxy(self.CONFIG % (dead, upstream.port, ""))
        holder = self.hold(proxy, upstream)           # marks dead down on the way, holds a slot on upstream
        old = proxy.upstreams
        live, down = old.states[("127.0.0.1", upstream.port, False)], old.states[("127.0.0.1", dead, False)]
        self.assertEqual((live.active, live.up, down.up, down.connect_failures), (1, True, False, 1))
        text = textwrap.dedent(self.CONFIG % (dead, upstream.port, "127.0.0.1:%d" % extra.port))
        new = agiproxy.Upstreams(agiproxy.parse_config(text, "<test>"), previous=old)
        self.assertIs(new.states[("127.0.0.1", upstream.port, False)], live)
        self.assertIs(new.states[("127.0.0.1", dead, False)], down)
        fresh = new.states[("127.0.0.1", extra.port, False)]
        self.assertNotIn(("127.0.0.1", extra.port, False), old.states)
        self.assertEqual((fresh.active, fresh.up, fresh.connect_failures, fresh.sessions), (0, True, 0, 0))
        self.assertEqual([m.state for m in new.pools["main"].members], [down, live, fresh])
        self.assertIsNot(new.pools["main"], old.pools["main"])
        self.assertEqual(new.pools["main"].active, 1)
        # Switch the running proxy to it (what SIGHUP does) and keep serving.
        path = os.path.join(self.tempdir(), "agiproxy.conf")
        with open(path, "w") as handle:
            handle.write(text)
        self.assertTrue(proxy.reload(path))
        self.assertIs(proxy.upstreams.states[("127.0.0.1", upstream.port, False)], live)
        self.assertEqual(asterisk(self.port(proxy), header("x")).commands, [b"ANSWER"])
        self.assertEqual(down.connect_failures, 1)    # still down: not retried after the reload
        holder.close()                                # the old session gives its slot back to the same state
        self.assertIdle(proxy)
        self.assertEqual((live.active, live.sessions), (0, 2))
        self.assertEqual(len(upstream.headers), 2)
        self.assertEqual(len(extra.headers), 0)


class PoolConfigTest(unittest.TestCase):
    """Item 11: parse_config and --check reject bad pool keys, naming them."""

    BASE = "[agiproxy]\n[pool main]\nservers = 127.0.0.1:4600%s\n%s\n[route r]\npath = *\npool = main\n"

    def error(self, extra, server_options=""):
        with self.assertRaises(agiproxy.ConfigError) as caught:
            make_config(self.BASE % (server_options, extra))
        return str(caught.exception)

    def test_pool_key_errors(self):
        self.assertIn("[pool main] check", self.error("check = http"))
        self.assertIn("none, tcp, agi", self.error("check = http"))
        self.assertIn("rise and fall must be 1 or more", self.error("check = agi\nrise = 0"))
        self.assertIn("rise and fall must be 1 or more", self.error("check = tcp\nfall = 0"))
        make_config(self.BASE % ("", "rise = 0"))                   # fine while checks are off
        message = self.error("on_saturation = /bin/true {pool}")
        self.assertIn("[pool main] on_saturation", message)
        self.assertIn("max=N", message)
        self.assertIn("max=N", self.error("on_recovery = /bin/true"))
        make_config(self.BASE % (" max=3", "on_recovery = /bin/true {capacity}"))
        self.assertIn("[pool main] retry_after_max", self.error("retry_after = 10\nretry_after_max = 5"))
        message = self.error("on_saturation = /bin/scale {pool} {load}", " max=3")
        self.assertIn("unknown placeholder {load}", message)
        self.assertIn("[pool main] on_saturation", message)
        self.assertIn("[pool main] saturation", self.error("saturation = 1.5"))
        self.assertIn("[pool main] saturation", self.error("saturation = 0"))
        self.assertIn("[pool main] check_interval", self.error("check_interval = often"))
        self.assertIn("[pool main] early_close_limit", self.error("early_close_limit = -1"))

    def test_zero_check_interval_or_timeout_rejected(self):
        """check_interval = 0 makes the checker spin against the servers; check_timeout = 0
        makes every connect non-blocking, so every check fails and every server goes down."""
        self.assertIn("check_interval", self.error("check = tcp\ncheck_interval = 0"))
        self.assertIn("check_timeout", self.error("check = tcp\ncheck_timeout = 0"))

    def test_check_command_line(self):
        folder = tempfile.mkdtemp(prefix="agiproxy-h3-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "agiproxy.conf")
        results = []
        for extra in ("check = agi\nrise = 0", "check = agi\nrise = 2"):
            with open(path, "w") as handle:
                handle.write(self.BASE % ("", extra))
            process = subprocess.Popen([sys.executable, PROGRAM, "-c", path, "--check"], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, universal_newlines=True)
            out, err = process.communicate(timeout=TIMEOUT)
            results.append((process.returncode, out, err))
        self.assertEqual(results[0][0], 2)
        self.assertIn("%s:5: [pool main] rise" % path, results[0][2])
        self.assertEqual(results[1][0], 0, results[1])
        self.assertIn("configuration OK", results[1][1])


###############################################################################
# Issue 5: TLS in and out, mutual TLS, client ACL, hardening ##################
###############################################################################

CERTS = {}
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = agiproxy-test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[wrong]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:wrong.example
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def openssl(directory, *args):
    process = subprocess.Popen(("openssl",) + args, cwd=directory, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=30)
    if process.returncode:
        raise RuntimeError("openssl %s failed: %s" % (" ".join(args), err.decode("utf-8", "replace")))


def certificates():
    """Throwaway PKI, built once per run by the openssl binary in a tempdir removed at exit.

    Returns a dict of paths: ca1, ca2 (certificates); server, wrong, client1, client2 each
    with a ``_key`` twin.  server is for 127.0.0.1 + localhost, wrong for wrong.example
    (both signed by CA1); client1 is signed by CA1, client2 by CA2."""
    if CERTS:
        return CERTS
    directory = tempfile.mkdtemp(prefix="agiproxy-h5-pki-")
    atexit.register(shutil.rmtree, directory, True)
    cnf = os.path.join(directory, "openssl.cnf")
    with open(cnf, "w") as handle:
        handle.write(OPENSSL_CNF)
    newkey = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    paths = {}
    for ca in ("ca1", "ca2"):
        openssl(directory, "req", "-x509", "-config", cnf, "-extensions", "ca", "-days", "2",
                    "-subj", "/CN=agiproxy test %s" % ca, "-keyout", ca + ".key", "-out", ca + ".pem", *newkey)
        paths[ca] = os.path.join(directory, ca + ".pem")
    serial = 100
    for name, section, ca, subject in (("server", "server", "ca1", "127.0.0.1"),
                                       ("wrong", "wrong", "ca1", "wrong.example"),
                                       ("client1", "client", "ca1", "asterisk-1"),
                                       ("client2", "client", "ca2", "asterisk-2")):
        serial += 1
        openssl(directory, "req", "-new", "-config", cnf, "-subj", "/CN=" + subject,
                    "-keyout", name + ".key", "-out", name + ".csr", *newkey)
        openssl(directory, "x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
                    "-set_serial", str(serial), "-days", "2", "-extfile", cnf, "-extensions", section,
                    "-out", name + ".pem")
        paths[name] = os.path.join(directory, name + ".pem")
        paths[name + "_key"] = os.path.join(directory, name + ".key")
    paths["dir"] = directory
    CERTS.update(paths)
    return CERTS


def tls12(context):
    if hasattr(context, "minimum_version") and hasattr(ssl, "TLSVersion"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin (guarded: 3.7+)
    return context


def server_context(cert="server", client_ca=None):
    certs = certificates()
    context = tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(certs[cert], certs[cert + "_key"])
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs[client_ca])
    return context


def client_context(ca="ca1", cert=None):
    """What a TLS-speaking Asterisk (or stunnel in front of it) would use."""
    certs = certificates()
    context = tls12(ssl.create_default_context(cafile=certs[ca]))
    # Tolerate a missing close_notify here (a separate test, TlsCloseTest, insists on it), so that
    # Python 3.6 + OpenSSL 3 reads an unclean TLS EOF as b"" like 3.7+ does.
    context.options |= agiproxy.IGNORE_UNEXPECTED_EOF
    if cert:
        context.load_cert_chain(certs[cert], certs[cert + "_key"])
    return context


def tls_listener_config(extra="", upstream_extra=""):
    """A proxy with a plain and a TLS listener in front of one plain server (``%d``)."""
    certs = certificates()
    return """
        [agiproxy]
        listen = 127.0.0.1:0
        tls_listen = 127.0.0.1:0
        tls_cert = %s
        tls_key = %s
        %s
        [pool main]
        servers = 127.0.0.1:%%d
        %s
        [route all]
        path = *
        pool = main
    """ % (certs["server"], certs["server_key"], extra.replace("\n", "\n" + " " * 8),
           upstream_extra.replace("\n", "\n" + " " * 8))


def tls_port(proxy):
    return [a for a in proxy.addresses if a[0]][0][2]


def plain_port(proxy):
    return [a for a in proxy.addresses if not a[0]][0][2]


def linger0(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def client_hello():
    """The bytes of a real TLS ClientHello, made without a socket."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def wait_closed(sock, deadline):
    """Wait for EOF or reset from the proxy, discarding nothing: return (closed, data seen, when)."""
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, data, time.monotonic()
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return False, data, time.monotonic()
        except (ConnectionResetError, BrokenPipeError):
            return True, data, time.monotonic()
        except ssl.SSLError:
            return True, data, time.monotonic()
        if not chunk:
            return True, data, time.monotonic()
        data += chunk


def local_name(sock):
    return agiproxy.format_address(*sock.getsockname()[:2])


class SecurityCase(ProxyCase):
    """ProxyCase plus the log and socket checks these tests share."""

    def warnings_for(self, name):
        return [m for m in LOG.messages(logging.WARNING) if name in m]

    def lines_for(self, name):
        return [m for m in LOG.messages() if name in m]

    def assertServes(self, proxy, port=None, tls=False, upstream=None):
        """A normal session still goes through (plain, or TLS with CA1)."""
        before = len(upstream.headers) if upstream is not None else None
        if tls:
            transcript = asterisk(port or tls_port(proxy), tls_context=client_context())
        else:
            transcript = asterisk(port or plain_port(proxy))
        self.assertEqual(transcript.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertFalse(transcript.failed)
        if upstream is not None:
            self.assertEqual(len(upstream.headers), before + 1)
        return transcript

    def tls_attempt(self, port, context, header=None):
        """Handshake, send a header and read: return (handshake_ok, data received, closed)."""
        sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        try:
            try:
                sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
            except (ssl.SSLError, OSError):
                return False, b"", True
            try:
                sock.sendall(header or trace_header("a-plain"))
            except (ssl.SSLError, OSError):
                return True, b"", True
            closed, data, _ = wait_closed(sock, time.monotonic() + TIMEOUT)
            return True, data, closed
        finally:
            sock.close()


class TlsListenerTest(SecurityCase):
    """tls_listen serves TLS clients; tls_client_ca makes client certificates mandatory."""

    def test_tls_client_end_to_end_to_a_plain_server(self):
        upstream = self.server()
        proxy = self.proxy(tls_listener_config(), upstream)
        header = trace_header("a-plain")
        transcript = asterisk(tls_port(proxy), header, tls_context=client_context())
        self.assertEqual(transcript.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertFalse(transcript.failed)
        self.assertEqual(upstream.headers, [header])
        self.assertEqual(upstream.replies, [[b"200 result=0\n", b"200 result=0\n"]])
        # by host name too: the certificate names localhost as well as 127.0.0.1
        transcript = asterisk(tls_port(proxy), header, tls_context=client_context(),
                              server_hostname="localhost")
        self.assertEqual(transcript.commands[0], b"ANSWER")
        self.assertIdle(proxy)
        wait_until(lambda: any(m.startswith("session client=127.0.0.1:") and 'end=COMPLETED why="upstream closed"' in m
                               for m in LOG.messages()), message="access log line")

    def test_mutual_tls_rejects_missing_and_foreign_client_certificates(self):
        upstream = self.server()
        certs = certificates()
        proxy = self.proxy(tls_listener_config("tls_client_ca = %s" % certs["ca1"]), upstream)
        port = tls_port(proxy)
        for label, context in (("no client certificate", client_context()),
                               ("client certificate of CA2", client_context(cert="client2"))):
            LOG.clear()
            handshake, data, closed = self.tls_attempt(port, context)
            self.assertTrue(closed, label)
            self.assertEqual(data, b"", label)
            wait_until(lambda: any("TLS handshake failed" in m for m in LOG.messages(logging.WARNING)),
                       message="a log line for the rejected client (%s)" % label)
            self.assertIdle(proxy)
        self.assertEqual(upstream.accepted, 0, "a rejected client must never reach the upstream")
        self.assertEqual(proxy.stats.failures["BADHEADER"], 2)
        # the right certificate goes through
        transcript = asterisk(port, tls_context=client_context(cert="client1"))
        self.assertEqual(transcript.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertEqual(upstream.accepted, 1)
        self.assertIdle(proxy)


class TlsUpstreamTest(SecurityCase):
    """Servers marked tls: verified against tls_ca by certificate and host name, unless told not to."""

    def tls_proxy(self, upstream, pool_extra="", flags="tls", global_extra=""):
        return self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            %s
            [pool main]
            servers = 127.0.0.1:%%d %s
            %s
            [route all]
            path = *
            pool = main
        """ % (global_extra, flags, pool_extra.replace("\n", "\n" + " " * 12)), upstream)

    def test_verified_upstream_on_the_right_ca(self):
        upstream = self.server(tls_context=server_context("server"))
        proxy = self.tls_proxy(upstream, "tls_ca = %s" % certificates()["ca1"])
        header = trace_header("a-plain")
        transcript = asterisk(self.port(proxy), header)
        self.assertEqual(transcript.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertIsNone(transcript.status)
        self.assertEqual(upstream.headers, [header])
        self.assertIdle(proxy)

    def assertNoUpstream(self, upstream, pool_extra, fragment):
        proxy = self.tls_proxy(upstream, pool_extra)
        transcript = asterisk(self.port(proxy))
        self.assertEqual(transcript.status, "NOUPSTREAM")
        self.assertTrue(transcript.failed)
        self.assertEqual(upstream.headers, [], "no header may be sent over an unverified connection")
        failures = [m for m in LOG.messages(logging.WARNING) if "connect failed" in m]
        self.assertEqual(len(failures), 1, failures)
        self.assertRegex(failures[0].lower(), fragment)
        self.assertIdle(proxy)

    def test_wrong_host_name_is_noupstream(self):
        upstream = self.server(tls_context=server_context("wrong"))
        self.assertNoUpstream(upstream, "tls_ca = %s" % certificates()["ca1"], "certificate|doesn't match")

    def test_unknown_ca_is_noupstream(self):
        upstream = self.server(tls_context=server_context("server"))
        self.assertNoUpstream(upstream, "tls_ca = %s" % certificates()["ca2"], "certificate.verify.failed")

    def test_tls_verify_no_in_the_pool_accepts_it(self):
        certs = certificates()
        for cert, ca in (("wrong", "ca1"), ("server", "ca2")):
            upstream = self.server(tls_context=server_context(cert))
            proxy = self.tls_proxy(upstream, "tls_ca = %s\ntls_verify = no" % certs[ca])
            self.assertEqual(asterisk(self.port(proxy)).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"], cert)
            self.assertEqual(len(upstream.headers), 1)
            self.assertIdle(proxy)

    def test_tls_verify_no_on_the_server_line_accepts_it(self):
        certs = certificates()
        for cert, ca in (("wrong", "ca1"), ("server", "ca2")):
            upstream = self.server(tls_context=server_context(cert))
            proxy = self.tls_proxy(upstream, "tls_ca = %s" % certs[ca], flags="tls tls_verify=no")
            self.assertEqual(asterisk(self.port(proxy)).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"], cert)
            self.assertEqual(len(upstream.headers), 1)
            self.assertIdle(proxy)

    def test_plain_server_behind_tls_flag_is_noupstream(self):
        upstream = self.server()     # speaks plain FastAGI: the handshake cannot succeed
        proxy = self.tls_proxy(upstream, "tls_ca = %s" % certificates()["ca1"], global_extra="connect_timeout = 0.5")
        started = time.monotonic()
        transcript = asterisk(self.port(proxy))
        self.assertEqual(transcript.status, "NOUPSTREAM")
        self.assertLess(time.monotonic() - started, 0.5 + 1.0, "the handshake is bounded by connect_timeout")
        self.assertIdle(proxy)


class TlsCloseTest(SecurityCase):
    """A TLS session ends like TLS should: close_notify, then the TCP close."""

    def test_tls_listener_ends_the_session_with_close_notify(self):
        upstream = self.server()
        proxy = self.proxy(tls_listener_config(), upstream)
        context = client_context()
        context.options &= ~agiproxy.IGNORE_UNEXPECTED_EOF
        sock = socket.create_connection(("127.0.0.1", tls_port(proxy)), TIMEOUT)
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
        with sock:
            sock.sendall(trace_header("a-plain"))
            deadline = time.monotonic() + TIMEOUT
            rest = b""
            for command in (b"ANSWER\n", b"GET VARIABLE CHANNEL\n"):
                line, rest = agiproxy.read_line(sock, deadline, rest)
                self.assertEqual(line, command)
                sock.sendall(b"200 result=0\n")
            sock.settimeout(TIMEOUT)
            try:
                end = sock.recv(100)
            except ssl.SSLError as exc:
                self.fail("the proxy closed the TLS connection without close_notify: %s" % exc)
            self.assertEqual(end, b"")
        self.assertIdle(proxy)

    def test_tls_upstream_closing_without_close_notify_is_a_close(self):
        upstream = self.server(tls_context=server_context())    # FakeServer just close()s
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            servers = 127.0.0.1:%%d tls
            tls_ca = %s
            [route all]
            path = *
            pool = main
        """ % certificates()["ca1"], upstream)
        self.assertEqual(asterisk(self.port(proxy)).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertIdle(proxy)
        wait_until(lambda: [m for m in LOG.messages() if m.startswith("session ")], message="the access log")
        line = [m for m in LOG.messages() if m.startswith("session ")][0]
        self.assertIn('end=COMPLETED why="upstream closed"', line)


class ChainTest(SecurityCase):

    def test_asterisk_plain_proxy_a_mtls_proxy_b_server(self):
        """Asterisk -> A (plain) -> B (TLS, client certificate of CA1 required) -> FastAGI server."""
        certs = certificates()
        upstream = self.server()
        proxy_b = self.proxy(tls_listener_config("tls_client_ca = %s" % certs["ca1"]), upstream)
        port_b = tls_port(proxy_b)
        proxy_a = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            servers = 127.0.0.1:%d tls
            tls_ca = %s
            tls_client_cert = %s
            tls_client_key = %s
            [route all]
            path = *
            pool = main
        """ % (port_b, certs["ca1"], certs["client1"], certs["client1_key"]))
        header = trace_header("a-plain")
        transcript = asterisk(self.port(proxy_a), header)
        self.assertEqual(transcript.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertFalse(transcript.failed)
        self.assertIsNone(transcript.status)
        self.assertEqual(upstream.headers, [header])      # A and B both forward it unchanged
        self.assertIn(b"agi_request: agi://127.0.0.1:4600/path/script?x=1&y=2\n", upstream.headers[0])
        self.assertIn(b"agi_network_script: path/script?x=1&y=2\n", upstream.headers[0])
        self.assertEqual(upstream.replies, [[b"200 result=0\n", b"200 result=0\n"]])
        self.assertIdle(proxy_a)
        self.assertIdle(proxy_b)
        sessions = [m for m in LOG.messages() if m.startswith("session ")]
        self.assertEqual(len(sessions), 2, sessions)   # one access-log line per proxy
        # B's server closed; how A reads B's close is TlsCloseTest's business (no close_notify)
        self.assertEqual(len([m for m in sessions if "/tls " not in m and 'end=COMPLETED why="upstream closed"' in m]), 1,
                         sessions)
        # A without its client certificate is refused by B: NOUPSTREAM at A, nothing reaches the server
        proxy_a2 = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            servers = 127.0.0.1:%d tls
            tls_ca = %s
            [route all]
            path = *
            pool = main
        """ % (port_b, certs["ca1"]))
        # (with TLS 1.3 A's handshake completes before B checks the certificate, so A sees B's
        # refusal as an upstream lost right after the header rather than a failed connect)
        transcript = asterisk(self.port(proxy_a2), header)
        self.assertEqual(len(upstream.headers), 1)
        self.assertTrue(transcript.failed, transcript)
        self.assertIn(transcript.commands, ([b"SET VARIABLE AGIPROXY_STATUS NOUPSTREAM"],
                                            [b"SET VARIABLE AGIPROXY_STATUS UPSTREAMLOST"]), transcript)
        self.assertIdle(proxy_a2)
        self.assertIdle(proxy_b)


class AclTest(SecurityCase):
    """allow/deny (and tls_allow/tls_deny): a denied client is closed before a byte is read."""

    def acl_proxy(self, upstream, acl, listen="127.0.0.1:0"):
        return self.proxy("""
            [agiproxy]
            listen = %s
            %s
            [pool main]
            servers = 127.0.0.1:%%d
            [route all]
            path = *
            pool = main
        """ % (listen, acl.replace("\n", "\n" + " " * 12)), upstream)

    def assertDenied(self, proxy, upstream, port, host="127.0.0.1", tls=False):
        """Connect, send a header, and see the connection end without one byte in return."""
        accepted = upstream.accepted
        denied = proxy.stats.failures["DENIED"]
        connections = proxy.stats.connections
        sock = socket.create_connection((host, port), TIMEOUT)
        closed, data = None, b""
        try:
            if tls:
                try:
                    sock = client_context().wrap_socket(sock, server_hostname="127.0.0.1")
                except (ssl.SSLError, OSError):
                    closed = True   # the handshake met a closed connection: that is the point
            if closed is None:
                try:
                    sock.sendall(trace_header("a-plain"))
                except OSError:
                    pass
                closed, data, _ = wait_closed(sock, time.monotonic() + TIMEOUT)
        finally:
            sock.close()
        self.assertTrue(closed)
        self.assertEqual(data, b"")
        wait_until(lambda: proxy.stats.failures["DENIED"] == denied + 1, message="the DENIED count")
        self.assertEqual(proxy.stats.connections, connections, "a denied client must not become a session")
        self.assertEqual(upstream.accepted, accepted, "a denied client must never reach the upstream")

    def test_allow_and_deny_ipv4(self):
        upstream = self.server()
        cases = (("deny = 127.0.0.1", False), ("deny = 127.0.0.0/8", False), ("allow = 10.0.0.0/8", False),
                 ("allow = 127.0.0.0/8\ndeny = 127.0.0.1/32", False),     # deny wins
                 ("allow = 10.0.0.0/8, 127.0.0.1", True), ("deny = 10.0.0.0/8", True),
                 ("deny = ::1", True), ("allow = ::/0", False))   # an IPv4 client is in no IPv6 network
        for acl, allowed in cases:
            LOG.clear()
            proxy = self.acl_proxy(upstream, acl)
            if allowed:
                self.assertServes(proxy, self.port(proxy), upstream=upstream)
                self.assertFalse([m for m in LOG.messages() if "denied" in m], acl)
            else:
                self.assertDenied(proxy, upstream, self.port(proxy))
                wait_until(lambda: "127.0.0.1: denied by allow/deny; closed" in LOG.messages(logging.WARNING),
                           message="the deny log line for %r" % acl)
            self.assertIdle(proxy)
            proxy.shutdown()

    @unittest.skipUnless(HAVE_IPV6, "no IPv6 loopback")
    def test_allow_and_deny_ipv6(self):
        upstream = self.server()
        cases = (("deny = ::1", False), ("deny = ::/0", False), ("allow = 2001:db8::/32", False),
                 ("allow = 127.0.0.0/8", False), ("allow = ::1/128\ndeny = ::1", False),
                 ("allow = ::1/128", True), ("deny = 2001:db8::/32, 127.0.0.1", True))
        for acl, allowed in cases:
            LOG.clear()
            proxy = self.acl_proxy(upstream, acl, listen="[::1]:0, 127.0.0.1:0")
            if allowed:
                self.assertEqual(asterisk(self.port(proxy, 0), host="::1").commands,
                                 [b"ANSWER", b"GET VARIABLE CHANNEL"], acl)
            else:
                self.assertDenied(proxy, upstream, self.port(proxy, 0), host="::1")
                wait_until(lambda: "::1: denied by allow/deny; closed" in LOG.messages(logging.WARNING),
                           message="the deny log line for %r" % acl)
            self.assertIdle(proxy)
            proxy.shutdown()
        # one list, both families: ::1 in, 127.0.0.1 out
        proxy = self.acl_proxy(upstream, "allow = ::1", listen="[::1]:0, 127.0.0.1:0")
        self.assertEqual(asterisk(self.port(proxy, 0), host="::1").commands[0], b"ANSWER")
        self.assertDenied(proxy, upstream, self.port(proxy, 1))
        self.assertIdle(proxy)

    def test_denied_connects_are_logged_at_a_limited_rate(self):
        upstream = self.server()
        proxy = self.acl_proxy(upstream, "deny = 127.0.0.1")
        started = time.monotonic()
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
            with sock:
                closed, data, _ = wait_closed(sock, time.monotonic() + TIMEOUT)
            self.assertTrue(closed)
            self.assertEqual(data, b"")
        wait_until(lambda: proxy.stats.failures["DENIED"] == 50, message="50 denied connections counted")
        lines = [m for m in LOG.messages() if "denied" in m or "not logged" in m]
        self.assertLessEqual(len(lines), 11, lines)
        self.assertGreaterEqual(len(lines), 1)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(upstream.accepted, 0)
        self.assertEqual(proxy.stats.connections, 0)
        # the plain log of a denial carries no secrets or bytes of the client: only its address
        self.assertEqual(set(lines), {"127.0.0.1: denied by allow/deny; closed"})

    def test_tls_allow_and_tls_deny_apply_to_the_tls_listener_only(self):
        upstream = self.server()
        # tls_deny: the TLS listener refuses 127.0.0.1, the plain one still serves it
        proxy = self.proxy(tls_listener_config("tls_deny = 127.0.0.1"), upstream)
        self.assertServes(proxy, upstream=upstream)
        self.assertDenied(proxy, upstream, tls_port(proxy), tls=True)
        wait_until(lambda: "127.0.0.1: denied by tls_allow/deny; closed" in LOG.messages(logging.WARNING),
                   message="the tls deny log line")
        self.assertIdle(proxy)
        proxy.shutdown()
        # allow keeps 127.0.0.1 off the plain listener; tls_allow lets it in over TLS
        LOG.clear()
        proxy = self.proxy(tls_listener_config("allow = 10.0.0.0/8\ntls_allow = 127.0.0.0/8"), upstream)
        self.assertDenied(proxy, upstream, plain_port(proxy))
        self.assertServes(proxy, tls=True, upstream=upstream)
        self.assertEqual(LOG.messages(logging.WARNING), ["127.0.0.1: denied by allow/deny; closed"])
        self.assertIdle(proxy)
        proxy.shutdown()
        # tls_allow alone does not open the plain listener to a client the plain allow refuses
        LOG.clear()
        proxy = self.proxy(tls_listener_config("tls_allow = 10.0.0.0/8"), upstream)
        self.assertServes(proxy, upstream=upstream)
        self.assertDenied(proxy, upstream, tls_port(proxy), tls=True)
        self.assertIdle(proxy)


class HostileInputTest(SecurityCase):
    """Each hostile client: one log line, a closed socket, and a proxy that still serves and is idle."""

    HEADER_TIMEOUT = 0.5

    def hostile_proxy(self, header_timeout=None):
        upstream = self.server()
        proxy = self.proxy(tls_listener_config(
            "header_timeout = %g\nmax_header_bytes = 4096\nmax_header_lines = 64"
            % (header_timeout or self.HEADER_TIMEOUT)), upstream)
        return proxy, upstream

    def send_and_wait(self, port, data, shut=False):
        """Send *data* (as far as the proxy lets us) and wait for the close; return (name, data, seconds)."""
        sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        name = local_name(sock)
        started = time.monotonic()
        try:
            try:
                if data:
                    sock.sendall(data)
                if shut:
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass      # the proxy closed already and we got a reset for the rest
            closed, got, when = wait_closed(sock, started + TIMEOUT)
        finally:
            sock.close()
        self.assertTrue(closed, "the proxy must close the connection")
        return name, got, when - started

    def settle(self, proxy, upstream, label, name, fragment, seconds, level=logging.WARNING):
        """The common checks: exactly one warning naming the client, the proxy serves, counts at zero."""
        wait_until(lambda: [m for m in LOG.messages(level) if name in m], message="the log line for " + label)
        self.assertIdle(proxy)
        lines = [m for m in LOG.messages(level) if name in m and not m.startswith("session ")]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(fragment, lines[0])
        self.assertFalse([r for r in LOG.records if r.exc_info], "no traceback for a hostile client")
        self.assertEqual(upstream.accepted, 0, "the upstream must not see a hostile client")
        self.assertServes(proxy, upstream=upstream)
        self.assertServes(proxy, tls=True, upstream=upstream)
        self.assertIdle(proxy)
        return lines[0]

    def test_slow_drip_is_cut_at_header_timeout(self):
        proxy, upstream = self.hostile_proxy()
        header = trace_header("a-plain")
        sock = socket.create_connection(("127.0.0.1", plain_port(proxy)), TIMEOUT)
        name = local_name(sock)
        started = time.monotonic()
        sent, closed_after = 0, None
        try:
            while time.monotonic() - started < TIMEOUT and sent < len(header):
                readable, _, _ = select.select([sock], [], [], 0.1)   # paces the drip, sees the close at once
                if readable:
                    closed, _, when = wait_closed(sock, time.monotonic() + 1)
                    if closed:
                        closed_after = when - started
                        break
                try:
                    sock.send(header[sent:sent + 1])
                    sent += 1
                except OSError:
                    closed_after = time.monotonic() - started
                    break
        finally:
            sock.close()
        self.assertIsNotNone(closed_after, "the slow client was never cut")
        self.assertGreaterEqual(closed_after, self.HEADER_TIMEOUT - 0.05)
        self.assertLessEqual(closed_after, self.HEADER_TIMEOUT + 0.5)
        self.assertLess(sent, 10)
        line = self.settle(proxy, upstream, "slow drip, 1 byte per 100 ms", name,
                           "header incomplete after header_timeout = 0.5s", closed_after)
        self.assertRegex(line, r"\(\d+ bytes\)")

    def test_silent_client_is_cut_at_header_timeout(self):
        proxy, upstream = self.hostile_proxy()
        name, got, seconds = self.send_and_wait(plain_port(proxy), b"")
        self.assertEqual(got, b"")
        self.assertGreaterEqual(seconds, self.HEADER_TIMEOUT - 0.05)
        self.assertLessEqual(seconds, self.HEADER_TIMEOUT + 0.5)
        self.settle(proxy, upstream, "connects and sends nothing", name,
                    "header incomplete after header_timeout = 0.5s (0 bytes)", seconds)

    def check_garbage(self, label, data, fragment, shut=False):
        proxy, upstream = self.hostile_proxy()
        name, got, seconds = self.send_and_wait(plain_port(proxy), data, shut)
        self.assertEqual(got, b"", "nothing may be answered to garbage")
        self.assertLess(seconds, self.HEADER_TIMEOUT, "garbage is refused at once, not at the timeout")
        self.settle(proxy, upstream, label, name, fragment, seconds)

    def test_http_request(self):
        self.check_garbage("HTTP request", b"GET / HTTP/1.1\r\nHost: agiproxy\r\nUser-Agent: curl\r\n\r\n",
                           "malformed header line 1")

    def test_http_request_first_line_only_no_blank_line(self):
        self.check_garbage("HTTP request line, connection kept open", b"GET / HTTP/1.1\r\n",
                           "malformed header line 1")

    def test_invalid_bytes(self):
        self.check_garbage("binary garbage", bytes(range(0x80, 0x100)) + b"\n", "malformed header line 1")

    def test_nul_byte_in_a_complete_header(self):
        self.check_garbage("NUL byte inside a complete header",
                           b"agi_network: yes\nagi_request: agi://127.0.0.1/x\x00y\n\n", "NUL byte in header")

    def test_nul_byte_in_an_unfinished_header(self):
        self.check_garbage("NUL byte, header not finished", b"agi_network: yes\nagi_\x00", "NUL byte in header")

    def test_over_long_line(self):
        self.check_garbage("line longer than max_header_bytes (4096)", b"agi_network: " + b"x" * 20000,
                           "header larger than max_header_bytes = 4096")

    def test_too_many_lines(self):
        self.check_garbage("more lines than max_header_lines (64)",
                           b"".join(b"agi_arg_%d: x\n" % i for i in range(200)), "more than max_header_lines = 64")

    def test_blank_lines_only(self):
        self.check_garbage("only blank lines (LF)", b"\n\n\n\n", "header of 0 lines without agi_request")

    def test_blank_lines_only_crlf(self):
        self.check_garbage("only blank lines (CRLF)", b"\r\n\r\n", "header of 0 lines without agi_request")

    def test_header_without_request_then_half_close(self):
        self.check_garbage("truncated header, then FIN", trace_header("a-plain")[:100], "client closed after 100 bytes",
                           shut=True)

    def test_reset_mid_session(self):
        proxy, upstream = self.hostile_proxy()
        sock = socket.create_connection(("127.0.0.1", plain_port(proxy)), TIMEOUT)
        name = local_name(sock)
        sock.sendall(trace_header("a-plain"))
        self.assertEqual(recv_exactly(sock, 7, time.monotonic() + TIMEOUT), b"ANSWER\n")   # mid-session now
        linger0(sock)
        sock.close()
        reset = time.monotonic()
        self.assertIdle(proxy)
        seconds = time.monotonic() - reset
        wait_until(lambda: upstream.threads and not any(t.is_alive() for t in upstream.threads),
                   message="the upstream to see the end of the session")
        self.assertFalse([r for replies in upstream.replies for r in replies if r],
                         "the upstream got no reply from the reset client, only the end of the session")
        wait_until(lambda: [m for m in LOG.messages() if name in m], message="the access log line")
        lines = [m for m in LOG.messages() if name in m]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn('end=CLIENTLOST why="client reset', lines[0])
        self.assertFalse(self.warnings_for(name))
        self.assertLess(seconds, 1.0)
        self.assertServes(proxy, upstream=upstream)
        self.assertIdle(proxy)

    def test_tls_client_on_the_plain_listener(self):
        proxy, upstream = self.hostile_proxy()
        sock = socket.create_connection(("127.0.0.1", plain_port(proxy)), TIMEOUT)
        name = local_name(sock)
        started = time.monotonic()
        with self.assertRaises((ssl.SSLError, OSError)):
            tls = client_context().wrap_socket(sock, server_hostname="127.0.0.1")
            tls.close()
        seconds = time.monotonic() - started
        sock.close()
        self.assertLess(seconds, self.HEADER_TIMEOUT)
        self.settle(proxy, upstream, "TLS ClientHello on the plain listener", name,
                    "TLS handshake on a plain listener", seconds)

    def test_plaintext_client_on_the_tls_listener(self):
        proxy, upstream = self.hostile_proxy()
        name, got, seconds = self.send_and_wait(tls_port(proxy), trace_header("a-plain"))
        self.assertNotIn(b"agi", got)
        self.assertLess(seconds, self.HEADER_TIMEOUT)
        self.settle(proxy, upstream, "plain FastAGI header on the TLS listener", name, "TLS handshake failed",
                    seconds)

    def test_stalled_tls_handshakes_do_not_block_others(self):
        timeout = 1.5
        proxy, upstream = self.hostile_proxy(timeout)
        port = tls_port(proxy)
        hello = client_hello()
        stallers = []
        for what, data in (("TLS handshake stalled: connect, send nothing", b""),
                           ("TLS handshake stalled: half a ClientHello", hello[:len(hello) // 2])):
            sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
            if data:
                sock.sendall(data)
            stallers.append((what, sock, local_name(sock), time.monotonic()))
        try:
            wait_until(lambda: len(proxy.sessions) == 2, message="both stallers to be sessions")
            for tls in (True, False, True):
                started = time.monotonic()
                self.assertServes(proxy, tls=tls, upstream=upstream)
                self.assertLess(time.monotonic() - started, 0.5, "a staller must not delay another session")
            for what, sock, name, started in stallers:
                readable, _, _ = select.select([sock], [], [], 0)
                self.assertFalse(readable, "the staller is still held (not cut early)")
            for what, sock, name, started in stallers:
                closed, got, when = wait_closed(sock, started + TIMEOUT)
                self.assertTrue(closed)
                self.assertEqual(got, b"")
                seconds = when - started
                self.assertGreaterEqual(seconds, timeout - 0.05)
                self.assertLessEqual(seconds, timeout + 0.5)
                wait_until(lambda: self.warnings_for(name), message="the log line of " + what)
                lines = self.warnings_for(name)
                self.assertEqual(len(lines), 1, lines)
                self.assertIn("TLS handshake not done within header_timeout", lines[0])
        finally:
            for _, sock, _, _ in stallers:
                sock.close()
        self.assertIdle(proxy)
        self.assertServes(proxy, tls=True, upstream=upstream)
        self.assertIdle(proxy)


def cpu_seconds(pid):
    """User + system CPU time of process *pid* (all its threads), from /proc."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def low_nofile(limit):
    def preexec():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))   # hard too: agiproxy raises soft to hard
    return preexec


def start_starved_proxy(case, upstream, global_extra="", pool_extra=""):
    """Start agiproxy as a child process with an open-file limit of EmfileTest.LIMIT in front of
    *upstream* (max_connections raised, so that idle clients can exhaust its descriptors at
    all); return ``(child, port, log_text)``."""
    directory = tempfile.mkdtemp(prefix="agiproxy-emfile-")
    case.addCleanup(shutil.rmtree, directory, True)
    logfile = os.path.join(directory, "agiproxy.log")
    conf = os.path.join(directory, "agiproxy.conf")
    with open(conf, "w") as handle:
        handle.write("[agiproxy]\nlisten = 127.0.0.1:0\nheader_timeout = 60\nmax_connections = 1000\n"
                     "log = %s\n%s\n[pool main]\nservers = 127.0.0.1:%d\n%s\n[route all]\npath = *\npool = main\n"
                     % (logfile, global_extra, upstream.port, textwrap.dedent(pool_extra)))
    stderr = open(os.path.join(directory, "stderr"), "wb")
    case.addCleanup(stderr.close)
    child = subprocess.Popen([sys.executable, PROGRAM, "-c", conf], stdin=subprocess.DEVNULL,
                             stdout=stderr, stderr=stderr, preexec_fn=low_nofile(EmfileTest.LIMIT))

    def stop():
        if child.poll() is None:
            child.kill()
        child.wait(TIMEOUT)
    case.addCleanup(stop)

    def log_text():
        try:
            with open(logfile) as handle:
                return handle.read()
        except IOError:
            return ""

    def listening():
        if child.poll() is not None:
            with open(os.path.join(directory, "stderr"), "rb") as handle:
                raise AssertionError("agiproxy exited %s: %r" % (child.returncode, handle.read()))
        return re.search(r"listening on 127\.0\.0\.1:(\d+)", log_text())
    port = int(wait_until(listening, message="the child proxy to listen").group(1))
    return child, port, log_text


@unittest.skipUnless(sys.platform.startswith("linux"), "needs /proc and RLIMIT_NOFILE")
class EmfileTest(SecurityCase):
    """Out of descriptors: accept() fails, agiproxy logs (rate limited), pauses instead of spinning, recovers."""

    LIMIT = 40

    def test_emfile_is_logged_does_not_spin_and_recovers(self):
        child, port, log_text = start_starved_proxy(self, self.server())
        self.assertIn("open-file limit %d" % self.LIMIT, log_text())
        idle = []
        try:
            for _ in range(self.LIMIT + 20):        # more than the child has descriptors for
                idle.append(socket.create_connection(("127.0.0.1", port), TIMEOUT))
            wait_until(lambda: "cannot accept" in log_text(), message="'cannot accept' in the log")
            # it does not spin: CPU time over a 1 s window stays low while accept keeps failing
            before = cpu_seconds(child.pid)
            window = threading.Event()
            window.wait(1.0)            # a measuring window, not synchronisation
            used = cpu_seconds(child.pid) - before
            self.assertLess(used, 0.5, "the accept loop spins at EMFILE: %.2fs CPU in 1s" % used)
            lines = [l for l in log_text().splitlines() if "cannot accept" in l]
            self.assertLessEqual(len(lines), 11, lines)
            self.assertRegex(lines[0], r"ERROR 127\.0\.0\.1:%d: cannot accept: .*[Tt]oo many open files.*"
                                       r"pausing accepts for [\d.]+s" % port)
        finally:
            for sock in idle:
                sock.close()
        # descriptors come back as the idle clients go: a normal session is served again
        started = time.monotonic()
        transcript = asterisk(port)
        self.assertEqual(transcript.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertLess(time.monotonic() - started, 5)
        wait_until(lambda: 'end=COMPLETED why="upstream closed"' in log_text(), message="the access log line of the session")
        child.send_signal(signal.SIGTERM)
        self.assertEqual(child.wait(TIMEOUT), 0)
        self.assertNotIn("Traceback", log_text())


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def fuzz_case(rng, header):
    """One malformed client: (label, bytes to send, how to end: close|reset|shut|session-reset|session-wait)."""
    lines = header.splitlines(True)[:-1]
    kind = rng.randrange(13)
    if kind == 0:
        return "random bytes", bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 600))), None
    if kind == 1:
        return "truncated header", header[:rng.randrange(1, len(header) - 1)], None
    if kind == 2:
        return "huge line", b"agi_network: " + b"x" * rng.randrange(4000, 12000) + b"\n\n", None
    if kind == 3:
        endings = (b"\n", b"\r\n", b"\r", b"\n\r", b"\r\r\n", b"")
        body = b"".join(l.rstrip(b"\r\n") + rng.choice(endings) for l in lines)
        return "random line endings", body + rng.choice(endings) + rng.choice(endings), None
    if kind == 4:
        data = bytearray(header)
        for _ in range(rng.randrange(1, 4)):
            data.insert(rng.randrange(len(data)), 0)
        return "NULs", bytes(data), None
    if kind == 5:
        data = bytearray(header)
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        return "flipped bytes", bytes(data), None
    if kind == 6:
        return "too many lines", b"".join(b"agi_arg_%d: %d\n" % (i, i) for i in range(rng.randrange(65, 400))), None
    if kind == 7:
        url = rng.choice([b"", b"agi://", b"http://x/", b"agi://[::1", b"agi://h:99999/x", b"\xff\xfe",
                          b"agi://127.0.0.1/" + bytes(rng.getrandbits(7) | 0x20 for _ in range(40))])
        return "bad agi_request", b"agi_network: yes\nagi_request: " + url + b"\n\n", None
    if kind == 8:
        return "blank lines", rng.choice([b"\n", b"\r\n", b"\n\n\n", b"\r\n\r\n"]), None
    if kind == 9:
        return "TLS hello on plain", client_hello()[:rng.randrange(1, 300)], None
    if kind == 10:
        line = rng.choice(lines)
        at = rng.randrange(len(lines) + 1)
        return "repeated name", b"".join(lines[:at] + [line] + lines[at:]) + b"\n", None
    if kind == 11:
        return "dripped 64 KB header", b"agi_network: yes\nagi_request: agi://127.0.0.1/" + b"x" * 65536 + b"\n\n", \
            "drip"
    return "valid header, reset mid-session", header, rng.choice(["session-reset", "session-close"])


def fuzz_one(rng, port, header):
    label, data, ending = fuzz_case(rng, header)
    ending = ending or rng.choice(["close", "reset", "shut", "shut"])
    sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    try:
        sock.settimeout(2)
        try:
            if ending == "drip":        # a few bytes at a time, until the proxy closes
                step = rng.randrange(1, 64)
                for start in range(0, len(data), step):
                    sock.sendall(data[start:start + step])
            elif ending.startswith("session") or rng.random() < 0.5:
                sock.sendall(data)
            else:      # in pieces, to cross recv() boundaries
                cut = rng.randrange(len(data) + 1)
                sock.sendall(data[:cut])
                sock.sendall(data[cut:])
            if ending == "reset":
                linger0(sock)
            elif ending == "shut":
                sock.shutdown(socket.SHUT_WR)
                wait_closed(sock, time.monotonic() + 2)
            elif ending.startswith("session"):
                if rng.random() < 0.7:
                    recv_exactly(sock, 7, time.monotonic() + 2)      # ANSWER: the session is live
                if ending == "session-reset":
                    linger0(sock)
        except OSError:
            pass          # the proxy closed first: fine
    finally:
        sock.close()
    return label


class FuzzTest(SecurityCase):
    """Thousands of malformed clients, then: the proxy serves, and its threads and descriptors are back."""

    def fuzz(self, seconds, workers=8):
        seed = int(os.environ.get("AGIPROXY_FUZZ_SEED") or random.SystemRandom().randrange(1 << 30))
        sys.stderr.write("\n[fuzz seed %d (set AGIPROXY_FUZZ_SEED to replay), %gs] " % (seed, seconds))
        upstream = self.server()
        proxy = self.proxy(tls_listener_config(
            "header_timeout = 0.5\nmax_header_bytes = 4096\nmax_header_lines = 64\nspare_threads = 16"), upstream)
        port = plain_port(proxy)
        header = trace_header("a-plain")
        # warm up: the worker pool at its working size, then a quiet baseline
        warm = [threading.Thread(target=asterisk, args=(port,)) for _ in range(workers * 2)]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join(TIMEOUT)
        self.assertIdle(proxy)
        wait_until(lambda: upstream.threads and not any(t.is_alive() for t in upstream.threads),
                   message="the warm-up sessions to end upstream")
        threads_before = threading.active_count() - proxy.workers.idle
        fds_before = open_fds()
        counts = collections.Counter()
        counts_lock = threading.Lock()
        errors = []
        deadline = time.monotonic() + seconds

        def client(index):
            rng = random.Random(seed * 1000 + index)
            try:
                while time.monotonic() < deadline:
                    label = fuzz_one(rng, port, header)
                    with counts_lock:
                        counts[label] += 1
            except Exception as exc:     # a client may not fail: connect refused would mean a dead listener
                errors.append(repr(exc))

        clients = [threading.Thread(target=client, args=(i,)) for i in range(workers)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(seconds + TIMEOUT)
        total = sum(counts.values())
        sys.stderr.write("%d connections: %s " % (total, dict(counts)))
        self.assertEqual(errors, [], "seed %d" % seed)
        self.assertGreater(total, 100, "seed %d: the fuzz hardly ran (a stuck proxy?)" % seed)
        self.assertIdle(proxy)
        self.assertServes(proxy)      # (not upstream=: the server may still be reading fuzz headers the
        self.assertServes(proxy, tls=True)   # proxy sent before its client reset)
        self.assertIdle(proxy)
        self.assertFalse([r.getMessage() for r in LOG.records if r.exc_info], "no traceback (seed %d)" % seed)
        self.assertFalse([m for m in LOG.messages() if "internal error" in m], "seed %d" % seed)

        def back_to_baseline():
            threads = threading.active_count() - proxy.workers.idle
            return threads <= threads_before and proxy.workers.idle <= proxy.workers.spare and \
                open_fds() <= fds_before + 2
        try:
            wait_until(back_to_baseline, message="threads and descriptors back to where they started")
        except AssertionError:
            raise AssertionError("seed %d: threads %d (+%d idle workers) vs %d, fds %d vs %d" % (
                seed, threading.active_count() - proxy.workers.idle, proxy.workers.idle, threads_before,
                open_fds(), fds_before))
        return total

    def test_fuzz_short(self):
        self.fuzz(3.0)

    @unittest.skipUnless(SOAK, "AGIPROXY_SOAK=1 runs the long fuzz")
    def test_fuzz_long(self):
        self.fuzz(30.0, workers=16)


###############################################################################
# Operations (issue 4): the real program in a child process ###################
###############################################################################

def program_header(name, url="agi://127.0.0.1/path/script?x=1&y=2"):
    """A real Asterisk header (trace a-plain) with its own uniqueid and request URL."""
    header = trace_header("a-plain")
    header = re.sub(rb"(?m)^agi_uniqueid: .*$", b"agi_uniqueid: " + name.encode(), header)
    header = re.sub(rb"(?m)^agi_request: .*$", b"agi_request: " + url.encode(), header)
    return header


def connect_refused(port):
    """True when a connect to 127.0.0.1:port is refused (nobody listening)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), 1.0)
    except ConnectionRefusedError:
        return True
    except OSError as exc:
        return exc.errno == errno.ECONNREFUSED
    sock.close()
    return False


PROM_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
PROM_COMMENT = re.compile(r"^# (HELP|TYPE) (%s) (.*)$" % PROM_METRIC_NAME)
PROM_SAMPLE = re.compile(r"^(%s)(?:\{(.*)\})? (\S+)(?: -?\d+)?$" % PROM_METRIC_NAME)
PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_prometheus(text):
    """A strict parser of the Prometheus text format (0.0.4).

    Returns ``(types, samples)``: family name -> type, and
    ``(name, ((label, value), ...))`` -> float.  Raises ValueError naming the line."""
    types, helps, samples = {}, set(), collections.OrderedDict()
    if not text.endswith("\n"):
        raise ValueError("exposition does not end with a newline")
    for number, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("#"):
            match = PROM_COMMENT.match(line)
            if not match or not match.group(3).strip():
                raise ValueError("line %d: malformed comment %r" % (number, line))
            kind, name, rest = match.groups()
            if kind == "TYPE":
                if rest not in ("counter", "gauge", "histogram", "summary", "untyped"):
                    raise ValueError("line %d: unknown type %r" % (number, rest))
                if name in types:
                    raise ValueError("line %d: second TYPE for %s" % (number, name))
                types[name] = rest
            else:
                if name in helps:
                    raise ValueError("line %d: second HELP for %s" % (number, name))
                helps.add(name)
            continue
        match = PROM_SAMPLE.match(line)
        if not match:
            raise ValueError("line %d: not 'name{labels} value': %r" % (number, line))
        name, labeltext, value = match.groups()
        labels, position = [], 0
        while labeltext and position < len(labeltext):
            found = PROM_LABEL.match(labeltext, position)
            if not found:
                raise ValueError("line %d: malformed labels %r" % (number, labeltext))
            raw = found.group(2)
            labels.append((found.group(1), raw.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")))
            position = found.end()
        try:
            number_value = float(value)
        except ValueError:
            raise ValueError("line %d: value %r is not a float" % (number, value))
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[:-len(suffix)]) in ("histogram", "summary"):
                family = name[:-len(suffix)]
        if family not in types:
            raise ValueError("line %d: sample of %s before its TYPE line" % (number, name))
        key = (name, tuple(sorted(labels)))
        if key in samples:
            raise ValueError("line %d: duplicate sample %r" % (number, key))
        samples[key] = number_value
    return types, samples


def metric_value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


class ProgramCase(unittest.TestCase):
    """Run agiproxy.py as a child process with a config and log file in a temporary directory."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="agiproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.conf = os.path.join(self.dir, "agiproxy.conf")
        self.log_path = os.path.join(self.dir, "agiproxy.log")
        self.port = free_port()
        self.stats_port = None
        self.child = None

    def server(self, *args, **kwargs):
        server = FakeServer(*args, **kwargs)
        self.addCleanup(server.stop)
        return server

    def write_config(self, body, stats=False, extra=""):
        """Write [agiproxy] (our port, our log file) followed by *body*."""
        lines = ["[agiproxy]", "listen = 127.0.0.1:%d" % self.port, "log = %s" % self.log_path]
        if stats:
            if self.stats_port is None:
                self.stats_port = free_port()
            lines.append("stats_listen = 127.0.0.1:%d" % self.stats_port)
        text = "\n".join(lines) + "\n" + textwrap.dedent(extra) + "\n" + textwrap.dedent(body)
        with open(self.conf + ".tmp", "w") as handle:
            handle.write(text)
        os.rename(self.conf + ".tmp", self.conf)    # a reload never sees half a file

    def env(self, **extra):
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra)
        return env

    def start(self, args=(), env=None):
        """Start the proxy on self.conf; return once it logged that it listens on our port."""
        self.stderr = open(os.path.join(self.dir, "stderr"), "wb")
        self.addCleanup(self.stderr.close)
        child = subprocess.Popen([sys.executable, PROGRAM, "-c", self.conf] + list(args), stdin=subprocess.DEVNULL,
                                 stdout=self.stderr, stderr=self.stderr, env=env or self.env(), close_fds=True)
        self.addCleanup(self.kill, child)
        self.child = child
        self.wait_log("listening on 127.0.0.1:%d" % self.port)
        return child

    @staticmethod
    def kill(child):
        if child.poll() is None:
            child.kill()
        child.wait(TIMEOUT)

    def child_stderr(self):
        with open(os.path.join(self.dir, "stderr"), "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def log_text(self, path=None):
        try:
            with open(path or self.log_path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except (IOError, OSError):
            return ""

    def wait_log(self, fragment, count=1, path=None, timeout=TIMEOUT):
        """Wait until the log holds *fragment* *count* times; fail at once if the child died."""
        def seen():
            if self.log_text(path).count(fragment) >= count:
                return True
            if self.child is not None and self.child.poll() is not None:
                raise AssertionError("agiproxy exited with %s before logging %r\nlog:\n%s\nstderr:\n%s"
                                     % (self.child.returncode, fragment, self.log_text(path)[-3000:],
                                        self.child_stderr()[-3000:]))
            return False
        wait_until(seen, timeout, "the log to contain %r %d time(s)" % (fragment, count))

    def wait_exit(self, timeout=TIMEOUT):
        wait_until(lambda: self.child.poll() is not None, timeout, "agiproxy to exit")
        return self.child.returncode

    def signal(self, signum):
        os.kill(self.child.pid, signum)

    def metrics_text(self, path="/metrics"):
        url = "http://127.0.0.1:%d%s" % (self.stats_port, path)
        handle = urllib.request.urlopen(url, timeout=TIMEOUT)
        try:
            return handle.read().decode("utf-8"), handle.headers.get("Content-Type", "")
        finally:
            handle.close()

    def metrics(self):
        return parse_prometheus(self.metrics_text()[0])[1]

    def run_cli(self, *args, **kwargs):
        """Run agiproxy.py with *args*; return (status, stdout, stderr)."""
        process = subprocess.Popen([sys.executable, PROGRAM] + list(args), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env(),
                                   universal_newlines=True, cwd=kwargs.get("cwd"))
        try:
            out, err = process.communicate(timeout=kwargs.get("timeout", TIMEOUT))
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            raise AssertionError("agiproxy %s did not finish:\n%s\n%s" % (" ".join(args), out, err))
        return process.returncode, out, err


LOOP_SCRIPT = ("ANSWER", "GET VARIABLE CHANNEL", "VERBOSE \"hello\" 1")
LOOP_REPLIES = [b"200 result=0\n"] * len(LOOP_SCRIPT)


def held_script(gate=None, script=("ANSWER", "GET VARIABLE CHANNEL"), marks=None):
    """A FakeServer behaviour: first command, wait for *gate* (seconds, or an Event: server.release by default),
    then the rest; records replies like the default behaviour.  *marks* gets 'held' and 'done' times."""
    def behaviour(conn, header, server):
        def before(index):
            if index != 1:
                return
            if marks is not None:
                marks["held"] = time.monotonic()
            if isinstance(gate, (int, float)):
                threading.Event().wait(gate)       # the session's own length, not synchronisation
            else:
                (gate or server.release).wait(TIMEOUT * 3)    # server.release: set by stop()

        server.run_script(conn, script, before)
        if marks is not None:
            marks["done"] = time.monotonic()
    return behaviour


class AsteriskThread(threading.Thread):
    """asterisk() in a thread; .result is the Transcript, .error the exception."""

    def __init__(self, port, header):
        threading.Thread.__init__(self, daemon=True)
        self.port, self.header = port, header
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            self.result = asterisk(self.port, self.header, timeout=TIMEOUT * 3)
        except Exception as exc:
            self.error = exc


class ReloadUnderLoadTest(ProgramCase):
    """SIGHUP while many fake Asterisks run sessions in a loop: no session may be lost."""

    def run_load(self, reloads, clients):
        """*clients* fake Asterisks loop on sessions while we reload *reloads* times (at least
        *clients* sessions complete between two reloads).  Returns a dict of what happened."""
        one, two = self.server(LOOP_SCRIPT), self.server(LOOP_SCRIPT)
        configs = [
            "[pool main]\nmode = round-robin\nservers = 127.0.0.1:%d\n  127.0.0.1:%d\n"
            "[route all]\npath = *\npool = main\n" % (one.port, two.port),
            "[pool main]\nmode = failover\nservers = 127.0.0.1:%d\n  127.0.0.1:%d\nretry_after = 2\n"
            "[route all]\npath = *\npool = main\n[route billing]\npath = billing\npool = main\n"
            % (two.port, one.port),
        ]
        self.write_config(configs[0], stats=True)
        self.start()
        stop = threading.Event()
        lock = threading.Lock()
        sent, done, errors = [], [0], []

        def client(number):
            count = 0
            while not stop.is_set():
                header = program_header("call-%d-%d" % (number, count))
                count += 1
                try:
                    transcript = asterisk(self.port, header)
                except Exception as exc:
                    with lock:
                        errors.append("client %d: %r" % (number, exc))
                    continue
                with lock:
                    sent.append(header)
                    if transcript.failed or transcript.commands != [c.encode() for c in LOOP_SCRIPT]:
                        errors.append("client %d: %r" % (number, transcript))
                    else:
                        done[0] += 1

        def completed():
            with lock:
                return done[0]

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        self.addCleanup(stop.set)
        try:
            for number in range(1, reloads + 1):
                mark = completed()
                wait_until(lambda: completed() >= mark + clients, message="sessions between reloads")
                self.write_config(configs[number % 2], stats=True)
                self.signal(signal.SIGHUP)
                wait_until(lambda: metric_value(self.metrics(), "agiproxy_config_reloads_total") >= number,
                           message="reload %d" % number)
            mark = completed()
            wait_until(lambda: completed() >= mark + clients, message="sessions after the last reload")
        finally:
            stop.set()
            for thread in threads:
                thread.join(TIMEOUT * 2)
        elapsed = time.monotonic() - started
        sys.stderr.write("\nreload soak: %d reloads, %d clients, %d sessions completed, %d errors, %.2fs\n"
                         % (reloads, clients, done[0], len(errors), elapsed))
        wait_until(lambda: metric_value(self.metrics(), "agiproxy_sessions_total") == done[0],
                   message="the proxy to count every session")
        return dict(servers=(one, two), sent=sent, completed=done[0], errors=errors, elapsed=elapsed)

    def test_reloads_lose_no_session(self):
        reloads, clients = (50, 16) if SOAK else (10, 8)
        run = self.run_load(reloads, clients)
        one, two = run["servers"]
        self.assertEqual(run["errors"], [])
        samples = self.metrics()
        self.assertEqual(metric_value(samples, "agiproxy_config_reloads_total"), reloads)
        self.assertEqual(metric_value(samples, "agiproxy_config_last_reload_success"), 1)
        self.assertEqual(metric_value(samples, "agiproxy_sessions_total"), run["completed"])
        # every header reached an upstream byte for byte, and every reply came back
        headers = one.headers + two.headers
        self.assertEqual(len(headers), len(run["sent"]))
        self.assertEqual(collections.Counter(headers), collections.Counter(run["sent"]))
        replies = one.replies + two.replies
        self.assertEqual(len(replies), run["completed"])
        self.assertTrue(all(r == LOOP_REPLIES for r in replies))
        self.assertGreater(len(one.headers), 0)
        self.assertGreater(len(two.headers), 0)
        # the log has its own writer thread: its last lines may follow by a moment
        wait_until(lambda: self.log_text().count("configuration reloaded") >= reloads,
                   message="a log line for every reload")
        text = self.log_text()
        self.assertEqual(text.count("configuration reloaded"), reloads)
        self.assertNotIn("reload failed", text)
        self.assertNotIn("internal error", text)
        self.assertNotIn("Traceback", text + self.child_stderr())

    def test_log_reopening_under_load_loses_no_line_and_leaks_no_descriptor(self):
        run = self.run_load(*((50, 16) if SOAK else (20, 8)))
        self.assertEqual(run["errors"], [])
        try:
            wait_until(lambda: self.log_text().count("session client=") >= run["completed"], timeout=3,
                       message="an access-log line for every session")
        except AssertionError:
            pass
        problems = []
        lines = self.log_text().count("session client=")
        if lines != run["completed"]:
            problems.append("%d sessions but %d access-log lines" % (run["completed"], lines))
        fd_dir = "/proc/%d/fd" % self.child.pid
        if os.path.isdir(fd_dir):
            on_log = [fd for fd in os.listdir(fd_dir)
                      if os.path.realpath(os.path.join(fd_dir, fd)) == os.path.realpath(self.log_path)]
            if len(on_log) != 1:
                problems.append("%d descriptors open on the log file" % len(on_log))
        self.assertEqual(problems, [])


class ReloadTest(ProgramCase):

    def test_changed_servers_take_new_sessions_while_old_ones_finish(self):
        old = self.server(behaviour=held_script())
        gate = old.release
        new = self.server()
        pool = "[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
        self.write_config(pool % old.port)
        self.start()
        held = AsteriskThread(self.port, program_header("held"))
        wait_until(lambda: len(old.headers) == 1, message="the held session to reach the old server")
        self.write_config(pool % new.port)
        self.signal(signal.SIGHUP)
        self.wait_log("configuration reloaded")
        for number in range(3):
            transcript = asterisk(self.port, program_header("new-%d" % number))
            self.assertEqual(transcript.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertEqual(len(new.headers), 3)
        self.assertEqual(old.accepted, 1)
        self.assertTrue(held.is_alive(), "the old session was cut by the reload")
        gate.set()
        held.join(TIMEOUT)
        self.assertIsNone(held.error)
        self.assertEqual(held.result.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertFalse(held.result.failed)
        self.assertEqual(old.replies, [[b"200 result=0\n", b"200 result=0\n"]])
        self.assertEqual(old.headers, [program_header("held")])
        self.wait_log("server=127.0.0.1:%d" % old.port)

    def test_invalid_config_keeps_the_running_one(self):
        first, second = self.server(), self.server()
        pool = "[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
        self.write_config(pool % first.port, stats=True)
        self.start()
        with open(self.conf, "a") as handle:
            handle.write("[pool main]\nservers = 127.0.0.1:%d\n" % second.port)     # duplicate section
        self.signal(signal.SIGHUP)
        self.wait_log("reload failed")
        self.assertIn("keeping the running configuration", self.log_text())
        self.assertIn(self.conf, self.log_text())
        self.assertEqual(asterisk(self.port).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertEqual((len(first.headers), len(second.headers)), (1, 0))
        samples = self.metrics()
        self.assertEqual(metric_value(samples, "agiproxy_config_last_reload_success"), 0)
        self.assertEqual(metric_value(samples, "agiproxy_config_reloads_total"), 0)
        # a bad value (file:line: [section] key in the log), then a good file again
        self.write_config(pool % second.port, stats=True, extra="header_timeout = soon\n")
        self.signal(signal.SIGHUP)
        self.wait_log("reload failed", count=2)
        self.assertIn("%s:5: [agiproxy] header_timeout" % self.conf, self.log_text())
        self.assertEqual(asterisk(self.port).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertEqual((len(first.headers), len(second.headers)), (2, 0))
        self.write_config(pool % second.port, stats=True)
        self.signal(signal.SIGHUP)
        self.wait_log("configuration reloaded")
        self.assertEqual(asterisk(self.port).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertEqual((len(first.headers), len(second.headers)), (2, 1))
        samples = self.metrics()
        self.assertEqual(metric_value(samples, "agiproxy_config_last_reload_success"), 1)
        self.assertEqual(metric_value(samples, "agiproxy_config_reloads_total"), 1)
        self.assertEqual(self.child.poll(), None)

    def test_log_file_reopened_on_hup(self):
        upstream = self.server()
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                          % upstream.port)
        self.start()
        asterisk(self.port, program_header("before", "agi://127.0.0.1/before-rotate"))
        self.wait_log("before-rotate")
        rotated = self.log_path + ".1"
        os.rename(self.log_path, rotated)        # what logrotate does
        self.signal(signal.SIGHUP)
        wait_until(lambda: os.path.exists(self.log_path), message="a new log file at the old path")
        self.signal(signal.SIGUSR1)       # handled after the HUP is done with: the new file is in use
        self.wait_log("status: ")
        asterisk(self.port, program_header("after", "agi://127.0.0.1/after-rotate"))
        self.wait_log("after-rotate")
        old = self.log_text(rotated)
        self.assertIn("before-rotate", old)
        self.assertNotIn("after-rotate", old)
        self.assertNotIn("status: ", old)
        self.assertNotIn("before-rotate", self.log_text())
        self.assertIn("configuration reloaded", old + self.log_text())
        fd_dir = "/proc/%d/fd" % self.child.pid
        if os.path.isdir(fd_dir):
            targets = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
            self.assertNotIn(rotated, targets, "the rotated file is still open")

    def test_usr1_writes_status_to_the_log(self):
        upstream = self.server()
        self.write_config("[pool main]\nservers = 127.0.0.1:%d max=7\n[route all]\npath = *\npool = main\n"
                          % upstream.port)
        self.start()
        asterisk(self.port)
        asterisk(self.port)
        self.wait_log("session client=", count=2)
        self.signal(signal.SIGUSR1)
        self.wait_log("status: ")
        text = self.log_text()
        self.assertRegex(text, r"status: 0 sessions live \(0 holding a server slot\), 2 relayed, 2 connections; "
                               r"failures: none; reloads 0")
        self.assertIn("pool main (failover): 0 active, 2 sessions", text)
        self.assertIn("server 127.0.0.1:%d: up, 0/7 active, 2 sessions, 0 connect failures" % upstream.port, text)
        self.assertIsNone(self.child.poll())


class DrainTest(ProgramCase):

    POOL = "[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"

    def test_term_refuses_new_connects_and_lets_a_session_finish(self):
        marks = {}
        upstream = self.server(behaviour=held_script(2.0, marks=marks))
        self.write_config(self.POOL % upstream.port)
        self.start()
        client = AsteriskThread(self.port, program_header("draining"))
        wait_until(lambda: "held" in marks, message="the session to be under way")
        signalled = time.monotonic()
        self.signal(signal.SIGTERM)
        # a SYN that arrives in the listener's last DRAIN_ACCEPT_GRACE is dropped, so the
        # client's kernel retries it after 1 s and is refused then: allow for that retry
        wait_until(lambda: connect_refused(self.port), timeout=3.0, message="connects to be refused")
        refused = time.monotonic()
        self.assertTrue(client.is_alive(), "the session ended before the listener closed")
        self.assertLess(refused - signalled, 2.5)
        self.assertIsNone(self.child.poll(), "exited while a session was running")
        self.assertEqual(self.wait_exit(), 0)
        exited = time.monotonic()
        client.join(TIMEOUT)
        self.assertIsNone(client.error)
        self.assertEqual(client.result.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.assertFalse(client.result.failed)
        self.assertEqual(upstream.replies, [[b"200 result=0\n", b"200 result=0\n"]])
        self.assertGreaterEqual(exited, marks["done"])
        self.assertGreaterEqual(exited - signalled, 1.5)
        text = self.log_text()
        # 1, or 2 when one of our refusal probes got in before the listener closed
        self.assertRegex(text, r"stopping: no longer accepting; waiting for [12] sessions")
        self.assertIn("all sessions ended; exiting", text)
        self.assertIn('request="agi://127.0.0.1/path/script?x=1&y=2"', text)

    def test_term_with_no_session_exits_at_once(self):
        upstream = self.server()
        self.write_config(self.POOL % upstream.port)
        self.start()
        self.signal(signal.SIGTERM)
        self.assertEqual(self.wait_exit(timeout=3), 0)
        self.assertIn("all sessions ended; exiting", self.log_text())

    def test_drain_timeout_cuts_a_stuck_session(self):
        upstream = self.server(behaviour=held_script())
        self.write_config(self.POOL % upstream.port, extra="drain_timeout = 1\n")
        self.start()
        client = AsteriskThread(self.port, program_header("stuck"))
        wait_until(lambda: len(upstream.headers) == 1, message="the session to be under way")
        signalled = time.monotonic()
        self.signal(signal.SIGTERM)
        self.assertEqual(self.wait_exit(timeout=5), 0)
        elapsed = time.monotonic() - signalled
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 1 + 1.5)
        client.join(TIMEOUT)
        self.assertIsNone(client.error)
        self.assertEqual(client.result.commands, [b"ANSWER"])
        text = self.log_text()
        self.assertIn("for up to 1s", text)
        self.assertRegex(text, r"closing session agi://127.0.0.1/path/script\?x=1&y=2 on 127.0.0.1:%d: "
                               r"drain_timeout = 1s reached" % upstream.port)
        self.assertIn('end=ABORTED why="drain_timeout = 1s reached"', text)

    def test_second_term_exits_at_once(self):
        upstream = self.server(behaviour=held_script())
        self.write_config(self.POOL % upstream.port)
        self.start()
        client = AsteriskThread(self.port, program_header("stuck"))
        wait_until(lambda: len(upstream.headers) == 1, message="the session to be under way")
        self.signal(signal.SIGTERM)
        self.wait_log("stopping: no longer accepting")
        self.assertIsNone(self.child.poll())
        signalled = time.monotonic()
        self.signal(signal.SIGTERM)
        self.assertEqual(self.wait_exit(timeout=3), 0)
        self.assertLess(time.monotonic() - signalled, 1.5)
        self.assertIn("second stop signal: exiting now, 1 sessions cut", self.log_text())
        client.join(TIMEOUT)
        self.assertEqual(client.result.commands, [b"ANSWER"])

    def test_hup_during_drain_is_ignored(self):
        upstream = self.server(behaviour=held_script())
        gate = upstream.release
        self.write_config(self.POOL % upstream.port)
        self.start()
        client = AsteriskThread(self.port, program_header("stuck"))
        wait_until(lambda: len(upstream.headers) == 1, message="the session to be under way")
        self.signal(signal.SIGTERM)
        self.wait_log("stopping: no longer accepting")
        self.signal(signal.SIGHUP)
        self.wait_log("SIGHUP ignored while draining")
        self.assertTrue(connect_refused(self.port))
        gate.set()
        self.assertEqual(self.wait_exit(), 0)
        client.join(TIMEOUT)
        self.assertEqual(client.result.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])


class StalledLogTest(ProgramCase):
    """Issue 9 item 1: a log nobody reads (stderr on a full pipe) never stops a call."""

    def test_calls_go_on_while_stderr_is_a_full_pipe(self):
        upstream = self.server()
        with open(self.conf, "w") as handle:
            handle.write("[agiproxy]\nlisten = 127.0.0.1:%d\nlog = stderr\n" % self.port + DrainTest.POOL % upstream.port)
        child = subprocess.Popen([sys.executable, PROGRAM, "-c", self.conf], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env())
        self.addCleanup(lambda: (self.kill(child), child.stderr.close()))
        wait_until(lambda: not connect_refused(self.port), message="the proxy to listen")
        errors, done = [], []

        def calls(count):
            try:
                for _ in range(count):
                    if asterisk(self.port).commands != SERVED:
                        errors.append("a call was not served")
                    done.append(1)
            except Exception as exc:
                errors.append(repr(exc))
        # ~250 bytes per access line: 1,500 calls are six times what a 64 KiB pipe holds
        threads = [threading.Thread(target=calls, args=(375,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 6)
        self.assertEqual(errors, [])
        self.assertEqual(len(done), 1500)
        started = time.monotonic()
        self.assertEqual(asterisk(self.port).commands, SERVED)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIsNone(child.poll())
        head = child.stderr.read(4096)          # reading unblocks the writer: the log goes on
        self.assertIn(b"listening on", head)


class LogQueueTest(unittest.TestCase):
    """The log queue drops what does not fit, counts it, and says so once there is room."""

    def test_a_full_queue_drops_and_reports(self):
        handler = agiproxy.LogQueue()
        handler.queue = queue.Queue(2)
        logger = logging.getLogger("agiproxy-test-queue")
        logger.propagate = False
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        for number in range(5):
            logger.warning("line %d", number)
        self.assertEqual(handler.dropped, 3)
        self.assertEqual([handler.queue.get_nowait().getMessage() for _ in range(2)], ["line 0", "line 1"])
        logger.warning("line 5")
        self.assertEqual([handler.queue.get_nowait().getMessage() for _ in range(2)],
                         ["3 log lines dropped: the log could not keep up", "line 5"])
        self.assertEqual(handler.dropped, 3)


class DrainLoopTest(ProgramCase):
    """Issue 9 item 5: calls in a tight loop across SIGTERM are served or refused, never reset."""

    def test_no_call_is_lost_across_a_drain(self):
        upstream = self.server()
        self.write_config(DrainTest.POOL % upstream.port)
        self.start()
        served, casualties, refused = [], [], []
        header = program_header("loop")

        def loop():
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                try:
                    transcript = asterisk(self.port, header)
                except ConnectionRefusedError:
                    refused.append(1)
                    return
                except OSError as exc:
                    if exc.errno == errno.ECONNREFUSED:
                        refused.append(1)
                        return
                    casualties.append(repr(exc))
                    continue
                (served if transcript.commands == SERVED else casualties).append(transcript)

        threads = [threading.Thread(target=loop) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(served) >= 100, message="calls to flow")
        self.signal(signal.SIGTERM)
        for thread in threads:
            thread.join(TIMEOUT * 2)
        self.assertEqual(self.wait_exit(), 0)
        self.assertEqual(casualties, [])
        self.assertEqual(len(refused), 4)
        self.assertEqual(len(upstream.headers), len(served))


class MetricsEndpointTest(ProgramCase):

    def test_parser_rejects_what_prometheus_would(self):
        good = "# HELP a_b x\n# TYPE a_b counter\na_b{x=\"1\",y=\"q\\\"\"} 3\n"
        self.assertEqual(parse_prometheus(good)[1], {("a_b", (("x", "1"), ("y", 'q"'))): 3.0})
        for bad in ("a_b 1\n", "# TYPE a_b counter\na_b one\n", "# TYPE a_b counter\na_b{x=1} 1\n",
                    "# TYPE a_b counter\na_b 1", "# TYPE a_b countr\n", "# TYPE a_b counter\na b 1\n",
                    "# TYPE a_b counter\na_b 1\na_b 2\n"):
            self.assertRaises(ValueError, parse_prometheus, bad)

    def test_counts_match_the_sessions_run(self):
        ivr, billing = self.server(), self.server(("ANSWER",))
        self.write_config("""
            [pool ivr]
            servers = 127.0.0.1:%d
            [pool billing]
            servers = 127.0.0.1:%d max=5
            [route ivr]
            path = ivr
            pool = ivr
            [route billing]
            path = billing
            pool = billing
        """ % (ivr.port, billing.port), stats=True)
        self.start()
        text, content_type = self.metrics_text()
        self.assertTrue(content_type.startswith("text/plain"), content_type)
        types, samples = parse_prometheus(text)
        self.assertEqual(metric_value(samples, "agiproxy_sessions_total"), 0)
        self.assertEqual(types["agiproxy_session_duration_seconds"], "histogram")
        for number in range(5):
            asterisk(self.port, program_header("i%d" % number, "agi://127.0.0.1/ivr/menu"))
        for number in range(3):
            asterisk(self.port, program_header("b%d" % number, "agi://127.0.0.1/billing"))
        noroute = asterisk(self.port, program_header("n", "agi://127.0.0.1/nowhere"))
        self.assertEqual((noroute.failed, noroute.status), (True, "NOROUTE"))
        wait_until(lambda: metric_value(self.metrics(), "agiproxy_sessions_total") == 8,
                   message="8 sessions counted")
        wait_until(lambda: metric_value(self.metrics(), "agiproxy_connections_total") == 9,
                   message="9 connections counted")
        text, _ = self.metrics_text()
        types, samples = parse_prometheus(text)
        value = lambda name, **labels: metric_value(samples, "agiproxy_" + name, **labels)
        self.assertEqual(value("sessions_active"), 0)
        self.assertEqual(value("failures_total", reason="NOROUTE"), 1)
        self.assertEqual(value("pool_sessions_total", pool="ivr"), 5)
        self.assertEqual(value("pool_sessions_total", pool="billing"), 3)
        self.assertEqual(value("server_sessions_total", pool="ivr", server="127.0.0.1:%d" % ivr.port), 5)
        self.assertEqual(value("server_sessions_total", pool="billing", server="127.0.0.1:%d" % billing.port), 3)
        self.assertEqual(value("server_sessions_max", pool="billing", server="127.0.0.1:%d" % billing.port), 5)
        self.assertEqual(value("server_up", pool="ivr", server="127.0.0.1:%d" % ivr.port), 1)
        self.assertEqual(value("server_connect_failures_total", pool="ivr", server="127.0.0.1:%d" % ivr.port), 0)
        self.assertEqual(value("session_duration_seconds_count"), 8)
        self.assertEqual(value("session_duration_seconds_bucket", le="+Inf"), 8)
        buckets = [(float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                   if name == "agiproxy_session_duration_seconds_bucket"]
        self.assertEqual(buckets, sorted(buckets), "buckets in order, counts cumulative")
        self.assertGreater(value("session_duration_seconds_sum"), 0)
        # up: at least every reply (whether the forwarded header counts is the program's choice)
        self.assertGreaterEqual(value("bytes_total", direction="up"), 13 * len(b"200 result=0\n"))
        self.assertEqual(value("bytes_total", direction="down"),
                         5 * len(b"ANSWER\nGET VARIABLE CHANNEL\n") + 3 * len(b"ANSWER\n"))
        self.assertEqual(value("config_last_reload_success"), 1)
        for name, kind in types.items():
            self.assertTrue(name.startswith("agiproxy_"), name)
            if kind == "counter":
                self.assertTrue(name.endswith("_total"), "counter %s without _total" % name)

    def test_other_paths_are_404(self):
        upstream = self.server()
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                          % upstream.port, stats=True)
        self.start()
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.metrics_text("/nope")
        self.assertEqual(caught.exception.code, 404)
        caught.exception.close()


class ProbeModeTest(ProgramCase):

    def test_probe_through_the_proxy_prints_the_commands(self):
        upstream = self.server(("ANSWER", "GET VARIABLE CHANNEL", "VERBOSE \"probe me\" 1"))
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                          % upstream.port)
        self.start()
        status, out, err = self.run_cli("--probe", "agi://127.0.0.1:%d/x" % self.port, "--arg", "a",
                                        "--var", "callerid=100")
        self.assertEqual(status, 0, out + err)
        for command in ("ANSWER", "GET VARIABLE CHANNEL", 'VERBOSE \\"probe me\\" 1'):
            self.assertRegex(out, r"(?m)^ *[\d.]+ ms <- %s$" % re.escape(command))
        self.assertIn("3 command(s) from 127.0.0.1:%d" % self.port, out)
        header = agiproxy.AgiHeader.parse(upstream.headers[0])
        self.assertEqual(header.get("agi_arg_1"), "a")
        self.assertEqual(header.get("agi_callerid"), "100")
        self.assertEqual(header.get("agi_request"), "agi://127.0.0.1:%d/x" % self.port)
        self.assertEqual(upstream.replies, [[b"200 result=0\n"] * 3])

    def test_probe_of_a_server_that_says_nothing_exits_1(self):
        def close_at_once(conn, header, server):
            pass
        silent = self.server(behaviour=close_at_once)
        status, out, err = self.run_cli("--probe", "agi://127.0.0.1:%d/x" % silent.port, "--timeout", "5")
        self.assertEqual(status, 1, out + err)
        self.assertIn("<EOF>", out)
        self.assertIn("0 command(s)", out)
        self.assertEqual(len(silent.headers), 1)

    def test_probe_of_the_failure_path_and_of_nothing(self):
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route only]\npath = ivr\npool = main\n"
                          % free_port())
        self.start()
        status, out, err = self.run_cli("--probe", "agi://127.0.0.1:%d/elsewhere" % self.port)
        self.assertEqual(status, 1, out + err)     # Asterisk would end the AGI with AGISTATUS=FAILURE
        self.assertIn("<- SET VARIABLE AGIPROXY_STATUS NOROUTE", out)
        self.assertIn("<- FAILURE", out)
        self.assertIn("AGISTATUS=FAILURE", out)
        status, out, err = self.run_cli("--probe", "agi://127.0.0.1:%d/x" % free_port())
        self.assertEqual(status, 1)
        self.assertIn("cannot connect", out)
        status, out, err = self.run_cli("--probe", "http://127.0.0.1/x")
        self.assertEqual(status, 2)
        self.assertNotIn("Traceback", err)


class DaemonTest(ProgramCase):

    def daemon_pid(self, pidfile):
        with open(pidfile) as handle:
            return int(handle.read().strip())

    @staticmethod
    def alive(pid):
        """True for a running process (a zombie nobody reaped counts as gone)."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            with open("/proc/%d/stat" % pid) as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (IOError, OSError):
            return True

    def kill_daemon(self, pidfile):
        try:
            pid = self.daemon_pid(pidfile)
        except (IOError, OSError, ValueError):
            return
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                ours = b"agiproxy.py" in handle.read()
        except (IOError, OSError):
            ours = False
        if ours and self.alive(pid):
            os.kill(pid, signal.SIGKILL)

    def start_daemon(self, pidfile, conf=None, cwd=None):
        self.addCleanup(self.kill_daemon, os.path.join(cwd or "/", pidfile))
        started = time.monotonic()
        status, out, err = self.run_cli("-c", conf or self.conf, "--daemon", "--pidfile", pidfile, cwd=cwd)
        return status, out, err, time.monotonic() - started

    def test_daemon_listens_before_the_parent_returns_and_term_removes_the_pidfile(self):
        upstream = self.server()
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                          % upstream.port)
        pidfile = os.path.join(self.dir, "agiproxy.pid")
        status, out, err, took = self.start_daemon(pidfile)
        self.assertEqual((status, out, err), (0, "", ""))
        # no waiting: the parent returned, so the daemon listens now
        self.assertEqual(asterisk(self.port).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        pid = self.daemon_pid(pidfile)
        self.assertTrue(self.alive(pid))
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            self.assertIn(b"--daemon", handle.read())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not os.path.exists(pidfile), message="the pid file to be removed")
        wait_until(lambda: not self.alive(pid), message="the daemon to exit")
        self.assertTrue(connect_refused(self.port))
        self.assertIn("agiproxy[%d]" % pid, self.log_text())
        self.assertIn("all sessions ended; exiting", self.log_text())

    def test_daemon_that_cannot_listen_fails_in_the_parent(self):
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", self.port))
        blocker.listen(1)
        self.write_config("[pool main]\nservers = 127.0.0.1:1\n[route all]\npath = *\npool = main\n")
        pidfile = os.path.join(self.dir, "agiproxy.pid")
        status, out, err, took = self.start_daemon(pidfile)
        self.assertEqual(status, 1)
        self.assertFalse(os.path.exists(pidfile))
        self.assertIn("cannot listen: listen = 127.0.0.1:%d" % self.port, self.log_text())

    def start_relative(self):
        """A daemon started from self.dir with ``-c agiproxy.conf --pidfile NAME``; return NAME."""
        upstream = self.server()
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                          % upstream.port)
        name = "agiproxy-test-%d-%d.pid" % (os.getpid(), self.port)
        self.addCleanup(lambda: os.path.exists("/" + name) and os.unlink("/" + name))
        self.addCleanup(self.kill_daemon, os.path.join("/", name))     # where a chdir("/") puts it
        status, out, err, took = self.start_daemon(name, conf="agiproxy.conf", cwd=self.dir)
        self.assertEqual(status, 0, err)
        return name

    def test_daemon_relative_pidfile_is_written_in_the_working_directory(self):
        name = self.start_relative()
        self.assertTrue(os.path.exists(os.path.join(self.dir, name)),
                        "relative --pidfile not written in the working directory (written at /%s: %s)"
                        % (name, os.path.exists("/" + name)))

    def test_daemon_started_with_a_relative_config_path_reloads(self):
        name = self.start_relative()
        pidfile = os.path.join(self.dir, name)
        pid = self.daemon_pid(pidfile if os.path.exists(pidfile) else "/" + name)
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "reload" in self.log_text(), message="the reload to be logged")
        self.assertNotIn("reload failed", self.log_text())
        self.wait_log("configuration reloaded", timeout=3)

    @unittest.skipIf(os.path.exists("/dev/log") or os.path.exists("/var/run/syslog"), "a syslog socket exists")
    def test_daemon_without_syslog_says_why(self):
        with open(self.conf, "w") as handle:
            handle.write("[agiproxy]\nlisten = 127.0.0.1:%d\n[pool main]\nservers = 127.0.0.1:1\n"
                         "[route all]\npath = *\npool = main\n" % self.port)
        pidfile = os.path.join(self.dir, "agiproxy.pid")
        status, out, err, took = self.start_daemon(pidfile)
        if status == 0:
            return          # it started (logging somewhere): fine
        self.assertTrue(err.strip(), "daemon exited %d with no word on stderr (log = stderr, no /dev/log)" % status)


class InstallTest(unittest.TestCase):

    def make(self, *args):
        process = subprocess.Popen(["make", "-C", HERE] + list(args), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        out, _ = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 0, out)
        return out

    @unittest.skipUnless(shutil.which("make") and shutil.which("install"), "needs make and install")
    def test_install_keeps_an_edited_config_and_uninstall_removes_the_program(self):
        root = tempfile.mkdtemp(prefix="agiproxy-destdir-")
        self.addCleanup(shutil.rmtree, root, True)
        self.make("install", "DESTDIR=" + root)
        program = os.path.join(root, "usr/local/bin/agiproxy")
        config = os.path.join(root, "usr/local/etc/agiproxy.conf")
        mode = os.stat(program).st_mode
        self.assertTrue(mode & stat.S_IXUSR and mode & stat.S_IXOTH, oct(mode))
        with open(program, "rb") as handle, open(PROGRAM, "rb") as original:
            self.assertEqual(handle.read(), original.read())
        with open(config, "rb") as handle, open(os.path.join(HERE, "agiproxy.conf.sample"), "rb") as sample:
            self.assertEqual(handle.read(), sample.read())
        self.assertEqual(os.stat(config).st_mode & 0o777, 0o644)
        process = subprocess.Popen([sys.executable, program, "-c", config, "--check"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, universal_newlines=True)
        out, err = process.communicate(timeout=TIMEOUT)
        self.assertEqual(process.returncode, 0, err)
        with open(config, "a") as handle:
            handle.write("\n; edited by the administrator\n")
        out = self.make("install", "DESTDIR=" + root)
        self.assertIn("keeping existing", out)
        with open(config) as handle:
            self.assertIn("edited by the administrator", handle.read())
        self.assertTrue(os.path.exists(config + ".sample"))
        self.make("uninstall", "DESTDIR=" + root)
        self.assertFalse(os.path.exists(program))
        self.assertFalse(os.path.exists(config + ".sample"))
        self.assertTrue(os.path.exists(config), "uninstall removed the administrator's configuration")


class SystemdNotifyTest(ProgramCase):

    def listen_notify(self, abstract=False):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = "agiproxy-test-%d-%d" % (os.getpid(), self.port)
            sock.bind("\0" + name)
            return sock, "@" + name
        path = os.path.join(self.dir, "notify")
        sock.bind(path)
        return sock, path

    @staticmethod
    def receive(sock, timeout=TIMEOUT):
        sock.settimeout(timeout)
        return sock.recv(4096).decode("ascii")

    def run_notify(self, abstract):
        upstream = self.server()
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                          % upstream.port)
        sock, address = self.listen_notify(abstract)
        child = subprocess.Popen([sys.executable, PROGRAM, "-c", self.conf], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=self.env(NOTIFY_SOCKET=address))
        self.addCleanup(self.kill, child)
        self.child = child
        self.assertEqual(self.receive(sock), "READY=1")
        self.assertFalse(connect_refused(self.port), "READY=1 before listening")
        self.assertEqual(asterisk(self.port).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        self.signal(signal.SIGHUP)
        self.assertEqual(self.receive(sock), "RELOADING=1")
        self.assertEqual(self.receive(sock), "READY=1")
        # the log is written by its own thread, so the line may follow READY=1 by a moment
        wait_until(lambda: "configuration reloaded" in self.log_text(), message="the reload's log line")
        self.signal(signal.SIGTERM)
        self.assertEqual(self.receive(sock), "STOPPING=1")
        self.assertEqual(self.wait_exit(), 0)

    def test_ready_reloading_stopping(self):
        self.run_notify(abstract=False)

    @unittest.skipUnless(sys.platform.startswith("linux"), "abstract sockets are Linux only")
    def test_abstract_notify_socket(self):
        self.run_notify(abstract=True)

    def test_notify_socket_gone_is_only_a_warning(self):
        upstream = self.server()
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                          % upstream.port)
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                          % upstream.port, extra="log_level = debug\n")
        self.start(env=self.env(NOTIFY_SOCKET=os.path.join(self.dir, "nobody-listens")))
        self.wait_log("cannot notify")
        self.assertEqual(asterisk(self.port).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])


class CommandLineTest(ProgramCase):

    def test_check_accepts_the_sample(self):
        sample = os.path.join(HERE, "agiproxy.conf.sample")
        status, out, err = self.run_cli("-c", sample, "--check")
        self.assertEqual(status, 0, err)
        self.assertRegex(out, r"agiproxy.conf.sample: configuration OK \(\d+ routes, \d+ pools\)")

    def test_check_names_file_line_section_and_key(self):
        broken = os.path.join(self.dir, "broken.conf")
        cases = [
            ("[agiproxy]\nlisten = 127.0.0.1:4573\n\n[pool a]\nservers = 127.0.0.1:5 wieght=2\n",
             "%s:5: [pool a] servers" % broken),
            ("[agiproxy]\nheader_timeout = soon\n", "%s:2: [agiproxy] header_timeout" % broken),
            ("[agiproxy]\n[pool a]\nservers = h\n[route r]\npath = x\npool = nowhere\n",
             "%s:6: [route r] pool" % broken),
            ("[agiproxy]\nlisen = 1.2.3.4\n", "%s:2: [agiproxy] lisen" % broken),
            ("listen = 1.2.3.4\n", broken),
            ("[agiproxy]\n[agiproxy]\n", broken),
            (b"[agiproxy]\nlog = /tmp/\xff\n", "not UTF-8"),
        ]
        for text, fragment in cases:
            with open(broken, "wb") as handle:
                handle.write(text if isinstance(text, bytes) else text.encode())
            status, out, err = self.run_cli("-c", broken, "--check")
            self.assertNotEqual(status, 0, text)
            self.assertIn(fragment, err, text)
            self.assertNotIn("Traceback", err)
            self.assertEqual(out, "")
        status, out, err = self.run_cli("-c", os.path.join(self.dir, "missing.conf"), "--check")
        self.assertNotEqual(status, 0)
        self.assertIn("missing.conf: cannot read configuration", err)
        self.assertNotIn("Traceback", err)

    def test_serving_a_port_in_use_says_so_without_a_traceback(self):
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", self.port))
        blocker.listen(1)
        with open(self.conf, "w") as handle:
            handle.write("[agiproxy]\nlisten = 127.0.0.1:%d\n" % self.port)
        status, out, err = self.run_cli("-c", self.conf)
        self.assertEqual(status, 1)
        self.assertIn("cannot listen: listen = 127.0.0.1:%d" % self.port, err)
        self.assertNotIn("Traceback", err)

    def test_explain_prints_route_pool_and_servers(self):
        self.write_config("""
            [pool billing]
            mode = failover
            servers =
                10.0.0.1:4573 weight=2 max=50
                10.0.0.9 backup
            [pool other]
            servers = 10.0.0.5
            [route pstn]
            agi_context = ^from-pstn$
            pool = other
            [route billing]
            path = billing
            pool = billing
        """)
        status, out, err = self.run_cli("-c", self.conf, "-t", "agi://pbx/billing/charge?x=1")
        self.assertEqual(status, 0, err)
        self.assertIn("route:    billing (longest path /billing)", out)
        self.assertIn("pool:     billing (mode failover)", out)
        self.assertIn("server 1: 10.0.0.1:4573 weight=2 max=50", out)
        self.assertIn("server 2: 10.0.0.9:4573 weight=1 backup", out)
        self.assertIn("agi_request: agi://pbx/billing/charge?x=1", out)
        status, out, err = self.run_cli("-c", self.conf, "-t", "agi://pbx/billing", "--var", "context=from-pstn")
        self.assertEqual(status, 0, err)
        self.assertIn("route:    pstn (conditions, in file order)", out)
        self.assertIn("server 1: 10.0.0.5:4573", out)
        status, out, err = self.run_cli("-c", self.conf, "-t", "agi://pbx/ivr")
        self.assertEqual(status, 1)
        self.assertIn("route:    none", out)
        self.assertIn("NOROUTE", out)
        status, out, err = self.run_cli("-c", self.conf, "-t", "not-a-url")
        self.assertEqual(status, 2)
        self.assertIn("not an agi://", err)
        self.assertNotIn("Traceback", err)

    def test_version(self):
        status, out, err = self.run_cli("--version")
        self.assertEqual(status, 0)
        self.assertEqual((out + err).strip(), "agiproxy " + agiproxy.__version__)
        self.assertRegex(agiproxy.__version__, r"^\d+\.\d+\.\d+$")


###############################################################################
# Init scripts ################################################################
###############################################################################


#: free_port() draws from below Linux's ephemeral range (32768-60999): a port it gives
#: cannot be taken meanwhile by an outgoing connection of a suite running beside this one.
FREE_PORTS = (20000, 32000)


def free_port():
    """A port nobody uses now, for a child proxy's configuration (which must name one)."""
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(*FREE_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in %d-%d" % FREE_PORTS)


class InitScriptTest(ProxyCase):

    def test_scripts_parse(self):
        for name in ("agiproxy.debian", "agiproxy.openrc", "agiproxy.redhat"):
            shell = "bash" if name.endswith("redhat") else "sh"
            self.assertEqual(subprocess.call([shell, "-n", os.path.join(HERE, "init.d", name)]), 0, name)

    @unittest.skipUnless(os.path.exists("/lib/init/init-d-script") and os.geteuid() == 0,
                         "needs Debian's init-d-script and root")
    def test_debian_script_starts_reloads_and_stops_the_proxy(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = lambda name: os.path.join(tmp, name)

        def write(name, text, mode=0o644):
            with open(path(name), "w") as handle:
                handle.write(text)
            os.chmod(path(name), mode)

        first, second = self.server(), self.server(behaviour=lambda c, h, s: s.release.wait(TIMEOUT))
        port = free_port()
        conf = "[agiproxy]\nlisten = 127.0.0.1:%d\nlog = %s\n[pool p]\nservers = 127.0.0.1:%%d\n" \
               "[route r]\npath = *\npool = p\n" % (port, path("agiproxy.log"))
        write("agiproxy.conf", conf % first.port)
        with open(PROGRAM) as handle:       # the real program, run by this test's interpreter
            write("agiproxy", "#!%s\n%s" % (sys.executable, handle.read().split("\n", 1)[1]), 0o755)
        with open(os.path.join(HERE, "init.d", "agiproxy.debian")) as handle:
            script = handle.read()
        os.mkdir(path("default"))
        # init-d-script reads /etc/default/$NAME after the script: this NAME leads to our defaults file
        write("agiproxy.init", re.sub(r"(?m)^NAME=.*", "NAME=../..%s/default/agiproxy" % tmp, script, 1), 0o755)
        write("default/agiproxy", "DAEMON=%s\nCONFIG=%s\nPIDFILE=%s\nOUTPUT_LOG=%s\n"
              % (path("agiproxy"), path("agiproxy.conf"), path("pid"), path("out.log")))

        def initd(action):
            return subprocess.call([path("agiproxy.init"), action], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                                   env=dict(os.environ, SYSTEMCTL_SKIP_REDIRECT="1"))

        self.assertEqual(initd("start"), 0)          # returns once agiproxy sent READY=1
        with open(path("pid")) as handle:
            pid = int(handle.read())
        self.addCleanup(lambda: os.path.exists("/proc/%d" % pid) and os.kill(pid, signal.SIGKILL))
        self.assertEqual(asterisk(port).commands[0], b"ANSWER")
        self.assertEqual(initd("status"), 0)
        write("agiproxy.conf", conf % second.port)
        self.assertEqual(initd("reload"), 0)
        wait_until(lambda: "configuration reloaded" in open(path("agiproxy.log")).read(), message="reload")
        held = socket.create_connection(("127.0.0.1", port), TIMEOUT)   # a live call on the new pool
        held.sendall(trace_header("a-plain"))
        wait_until(lambda: second.headers, message="the held session to reach the new pool")
        stopper = threading.Thread(target=lambda: self.assertEqual(initd("stop"), 0))
        stopper.start()
        wait_until(lambda: "stopping" in open(path("agiproxy.log")).read(), message="the drain to start")
        self.assertTrue(stopper.is_alive(), "stop must wait for the live call")
        second.release.set()
        self.assertTrue(expect_eof(held, time.monotonic() + TIMEOUT))
        held.close()
        stopper.join(TIMEOUT)
        self.assertFalse(stopper.is_alive())
        self.assertFalse(os.path.exists(path("pid")))
        self.assertEqual(initd("status"), 3)
        self.assertEqual(len(first.headers), 1)


###############################################################################
# Real Asterisk traces, embedded byte-exact (see the README of asterisk-traces)
###############################################################################

TRACES = {}

TRACES["a-plain"] = r"""
# scenario: a-plain
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/path/script?x=1&y=2
# server: echo_fastagi.py --mode echo
# harness: asterisk_agi.py --calls 1 --args alpha,beta gamma
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:39476 at 2026-11-25 14:15:29
+0.002432 A>S agi_network: yes\n
          A>S agi_network_script: path/script?x=1&y=2\n
          A>S agi_request: agi://127.0.0.1:4600/path/script?x=1&y=2\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616129.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.002447 A>S agi_extension: s\n
          A>S agi_priority: 4\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 140413166036672\n
          A>S agi_arg_1: alpha\n
          A>S agi_arg_2: beta gamma\n
          A>S \n
+0.002925 S>A ANSWER\n
+0.023607 A>S 200 result=0\n
+0.023817 S>A GET VARIABLE CHANNEL\n
+0.023916 A>S 200 result=1 (Local/s@agitest-00000000;2)\n
+0.024025 S>A SET VARIABLE AGI_SEEN_PATH "path/script?x=1&y=2"\n
+0.024119 A>S 200 result=1\n
+0.024197 S>A SET VARIABLE AGI_SEEN_ARG1 "alpha"\n
+0.024485 A>S 200 result=1\n
+0.024573 S>A VERBOSE "hello" 1\n
+0.024685 A>S 200 result=1\n
+0.024727 S>A EXEC Wait 0.2\n
+0.225797 A>S 200 result=0\n
+0.226063 S>A <EOF>
+0.226605 A>S HANGUP\n
+0.226633 A>S <EOF>
"""

TRACES["b-hangup-idle"] = r"""
# scenario: b-hangup-idle
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/hold
# server: echo_fastagi.py --mode hold
# harness: asterisk_agi.py --calls 1 --hangup-after 1
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:39480 at 2026-11-25 14:15:31
+0.002623 A>S agi_network: yes\n
          A>S agi_network_script: hold\n
          A>S agi_request: agi://127.0.0.1:4600/hold\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616131.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.002640 A>S agi_extension: s\n
          A>S agi_priority: 5\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 139669690091200\n
          A>S \n
+0.003182 S>A ANSWER\n
+0.023668 A>S 200 result=0\n
+0.999776 A>S HANGUP\n
+1.000117 S>A ANSWER\n
+1.000331 A>S 511 Command Not Permitted on a dead channel or intercept routine\n
+1.000579 S>A STREAM FILE beep ""\n
+1.000679 A>S 511 Command Not Permitted on a dead channel or intercept routine\n
+1.000751 S>A GET VARIABLE CHANNEL\n
+1.000894 A>S 200 result=1 (Local/s@agitest-00000000;2)\n
+1.001013 S>A SET VARIABLE AGI_AFTER_HANGUP 1\n
+1.001068 A>S 200 result=1\n
+1.001200 S>A NOOP\n
+1.001332 A>S 200 result=0\n
+1.001379 S>A <EOF>
+1.001889 A>S HANGUP\n
+1.001928 A>S <EOF>
"""

TRACES["b2-hangup-remote-ami"] = r"""
# scenario: b2-hangup-remote-ami
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/hold
# server: echo_fastagi.py --mode hold
# harness: asterisk_agi.py --calls 1 --hangup-after 1 --hangup-method ami
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:39494 at 2026-11-25 14:15:34
+0.002504 A>S agi_network: yes\n
          A>S agi_network_script: hold\n
          A>S agi_request: agi://127.0.0.1:4600/hold\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616134.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.002520 A>S agi_extension: s\n
          A>S agi_priority: 4\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 140475377690304\n
          A>S \n
+0.002854 S>A ANSWER\n
+0.023613 A>S 200 result=0\n
+1.001614 A>S HANGUP\n
+1.001854 S>A ANSWER\n
+1.001931 A>S 511 Command Not Permitted on a dead channel or intercept routine\n
+1.002128 S>A STREAM FILE beep ""\n
+1.002162 A>S 511 Command Not Permitted on a dead channel or intercept routine\n
+1.002277 S>A GET VARIABLE CHANNEL\n
+1.002369 A>S 200 result=1 (Local/s@agitest-00000000;2)\n
+1.002512 S>A SET VARIABLE AGI_AFTER_HANGUP 1\n
+1.002609 A>S 200 result=1\n
+1.002700 S>A NOOP\n
+1.002845 A>S 200 result=0\n
+1.002899 S>A <EOF>
+1.003028 A>S HANGUP\n
+1.003054 A>S <EOF>
"""

TRACES["b3-hangup-during-exec"] = r"""
# scenario: b3-hangup-during-exec
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/exec
# server: echo_fastagi.py --script ANSWER;EXEC Wait 5;NOOP;@waitline 2;GET VARIABLE CHANNEL;@close
# harness: asterisk_agi.py --calls 1 --hangup-after 1
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:59416 at 2026-11-25 14:15:37
+0.002383 A>S agi_network: yes\n
          A>S agi_network_script: exec\n
          A>S agi_request: agi://127.0.0.1:4600/exec\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616137.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.002397 A>S agi_extension: s\n
          A>S agi_priority: 5\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 140402241894080\n
          A>S \n
+0.002860 S>A ANSWER\n
+0.023311 A>S 200 result=0\n
+0.023526 S>A EXEC Wait 5\n
+1.000016 A>S 200 result=-1\n
+1.000402 S>A NOOP\n
+1.000583 A>S HANGUP\n
+1.041849 A>S 200 result=0\n
+3.044468 S>A GET VARIABLE CHANNEL\n
+3.044745 A>S 200 result=1 (Local/s@agitest-00000000;2)\n
+3.044926 S>A <EOF>
+3.045382 A>S HANGUP\n
+3.045867 A>S <EOF>
"""

TRACES["c-bad-commands"] = r"""
# scenario: c-bad-commands
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/bad
# server: echo_fastagi.py --script ANSWER;FOOBAR;STREAM FILE;GET DATA;@cmd;noop;@crlf SET VARIABLE CRLF_TEST abc;GET FULL VARIABLE >${CRLF_TEST}<;@close
# harness: asterisk_agi.py --calls 1 
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:59430 at 2026-11-25 14:15:42
+0.002637 A>S agi_network: yes\n
          A>S agi_network_script: bad\n
          A>S agi_request: agi://127.0.0.1:4600/bad\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616142.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.002652 A>S agi_extension: s\n
          A>S agi_priority: 4\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 139808911173312\n
          A>S \n
+0.002819 S>A ANSWER\n
+0.023332 A>S 200 result=0\n
+0.023592 S>A FOOBAR\n
+0.023696 A>S 510 Invalid or unknown command\n
+0.023800 S>A STREAM FILE\n
+0.023872 A>S 520-Invalid command syntax.  Proper usage follows:\n
+0.064909 A>S Send the given file, allowing playback to be interrupted by the given digits, if any. Returns <literal>0</literal> if playback completes without a digit being pressed, or the ASCII numerical value of the digit if one was pressed, or <literal>-1</literal> on error or if the channel was disconnected. If musiconhold is playing before calling stream file it will be automatically stopped and will not be restarted after completion.\n
          A>S It sets the following channel variables upon completion:\n
          A>S <variable>PLAYBACKSTATUS</variable>: The status of the playback attempt as a text string.\n
          A>S     <value>SUCCESS</value>\n
          A>S     <value>FAILED</value>\n
          A>S 520 End of proper usage.\n
+0.065102 S>A GET DATA\n
+0.065270 A>S 520-Invalid command syntax.  Proper usage follows:\n
+0.108923 A>S Stream the given <replaceable>file</replaceable>, and receive DTMF data.\n
          A>S Returns the digits received from the channel at the other end.\n
          A>S 520 End of proper usage.\n
+0.113157 S>A \n
+0.113565 A>S 510 Invalid or unknown command\n
+0.113633 S>A noop\n
+0.113716 A>S 200 result=0\n
+0.113753 S>A SET VARIABLE CRLF_TEST abc\r\n
+0.113811 A>S 200 result=1\n
+0.113843 S>A GET FULL VARIABLE >${CRLF_TEST}<\n
+0.113890 A>S 200 result=1 (>abc\r<)\n
+0.114352 S>A <EOF>
+0.114468 A>S HANGUP\n
+0.114498 A>S <EOF>
"""

TRACES["d-missing-sound"] = r"""
# scenario: d-missing-sound
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/missing
# server: echo_fastagi.py --mode missing
# harness: asterisk_agi.py --calls 1 
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:59444 at 2026-11-25 14:15:44
+0.001974 A>S agi_network: yes\n
          A>S agi_network_script: missing\n
          A>S agi_request: agi://127.0.0.1:4600/missing\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616144.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.001988 A>S agi_extension: s\n
          A>S agi_priority: 4\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 139932409284288\n
          A>S \n
+0.002456 S>A ANSWER\n
+0.022907 A>S 200 result=0\n
+0.023118 S>A STREAM FILE no-such-sound-file ""\n
+0.023368 A>S 200 result=-1 endpos=0\n
+0.023518 S>A GET DATA no-such-sound-file 100 2\n
+0.023694 A>S 200 result=-1\n
+0.024107 S>A <EOF>
+0.024324 A>S HANGUP\n
+0.024411 A>S <EOF>
"""

TRACES["e-hangup-nosighup"] = r"""
# scenario: e-hangup-nosighup
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/hold
# server: echo_fastagi.py --mode hold-short
# harness: asterisk_agi.py --calls 1 --hangup-after 1 --set AGISIGHUP=no
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:37990 at 2026-11-25 14:15:47
+0.003733 A>S agi_network: yes\n
          A>S agi_network_script: hold\n
          A>S agi_request: agi://127.0.0.1:4600/hold\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616147.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.003759 A>S agi_extension: s\n
          A>S agi_priority: 6\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 140565021988544\n
          A>S \n
+0.004494 S>A ANSWER\n
+0.025533 A>S 200 result=0\n
+3.030519 S>A ANSWER\n
+3.030862 A>S 511 Command Not Permitted on a dead channel or intercept routine\n
+3.031104 S>A STREAM FILE beep ""\n
+3.031650 A>S 511 Command Not Permitted on a dead channel or intercept routine\n
+3.031842 S>A GET VARIABLE CHANNEL\n
+3.032046 A>S 200 result=1 (Local/s@agitest-00000000;2)\n
+3.032189 S>A SET VARIABLE AGI_AFTER_HANGUP 1\n
+3.032405 A>S 200 result=1\n
+3.032468 S>A NOOP\n
+3.032647 A>S 200 result=0\n
+3.032695 S>A <EOF>
+3.033702 A>S <EOF>
"""

TRACES["f-failure-line"] = r"""
# scenario: f-failure-line
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/route/unknown
# server: echo_fastagi.py --mode failure
# harness: asterisk_agi.py --calls 1 
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:38004 at 2026-11-25 14:15:51
+0.002798 A>S agi_network: yes\n
          A>S agi_network_script: route/unknown\n
          A>S agi_request: agi://127.0.0.1:4600/route/unknown\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616151.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.002816 A>S agi_extension: s\n
          A>S agi_priority: 4\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 140635822913216\n
          A>S \n
+0.003002 S>A FAILURE\n
+0.003031 S>A <EOF>
+0.003198 A>S HANGUP\n
+0.003220 A>S <EOF>
"""

TRACES["g-close-after-header"] = r"""
# scenario: g-close-after-header
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600/close
# server: echo_fastagi.py --mode close-after-header
# harness: asterisk_agi.py --calls 1 
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:38020 at 2026-11-25 14:15:53
+0.002391 A>S agi_network: yes\n
          A>S agi_network_script: close\n
          A>S agi_request: agi://127.0.0.1:4600/close\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616153.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
+0.002407 A>S agi_extension: s\n
          A>S agi_priority: 4\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 140710236522176\n
          A>S \n
+0.002766 S>A <EOF>
+0.003078 A>S HANGUP\n
+0.003102 A>S <EOF>
"""

TRACES["h-no-path"] = r"""
# scenario: h-no-path
# asterisk: Asterisk GIT-master-f0c1c1a7b7
# url: agi://127.0.0.1:4600
# server: echo_fastagi.py --mode echo
# harness: asterisk_agi.py --calls 1 
# format: +seconds DIR escaped-bytes; A>S = Asterisk to server, S>A = server to Asterisk;
# a '+t' line starts a recv() chunk, indented lines continue it; <...> are relay notes
## connection 1 from 127.0.0.1:36276 at 2026-11-25 14:15:57
+0.002314 A>S agi_network: yes\n
          A>S agi_request: agi://127.0.0.1:4600\n
          A>S agi_channel: Local/s@agitest-00000000;2\n
          A>S agi_language: en\n
          A>S agi_type: Local\n
          A>S agi_uniqueid: 1795616157.1\n
          A>S agi_version: GIT-master-f0c1c1a7b7\n
          A>S agi_callerid: 1001\n
          A>S agi_calleridname: AGI harness\n
          A>S agi_callingpres: 0\n
          A>S agi_callingani2: 0\n
          A>S agi_callington: 0\n
          A>S agi_callingtns: 0\n
          A>S agi_dnid: unknown\n
          A>S agi_rdnis: unknown\n
          A>S agi_context: agitest\n
          A>S agi_extension: s\n
+0.002328 A>S agi_priority: 4\n
          A>S agi_enhanced: 0.0\n
          A>S agi_accountcode: \n
          A>S agi_threadid: 140550542227136\n
          A>S \n
+0.002770 S>A ANSWER\n
+0.023296 A>S 200 result=0\n
+0.023530 S>A GET VARIABLE CHANNEL\n
+0.023588 A>S 200 result=1 (Local/s@agitest-00000000;2)\n
+0.023896 S>A SET VARIABLE AGI_SEEN_PATH ""\n
+0.023994 A>S 200 result=1\n
+0.024069 S>A SET VARIABLE AGI_SEEN_ARG1 ""\n
+0.024120 A>S 200 result=1\n
+0.024346 S>A VERBOSE "hello" 1\n
+0.024412 A>S 200 result=1\n
+0.024519 S>A EXEC Wait 0.2\n
+0.225476 A>S 200 result=0\n
+0.225803 S>A <EOF>
+0.226388 A>S HANGUP\n
+0.226423 A>S <EOF>
"""


###############################################################################
# Hostile input and exhaustion (issue 10) #####################################
###############################################################################

def process_gone(pid):
    """True once *pid* has exited (a zombie nobody reaps counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (IOError, OSError):
        return True


class CountingBuffer(bytearray):
    """The scanner's buffer, counting the bytes find() looks at."""

    examined = 0

    def find(self, sub, start=0, end=None):
        end = len(self) if end is None else end
        found = bytearray.find(self, sub, start, end)
        CountingBuffer.examined += (found + 1 if found >= 0 else end) - start
        return found


HOSTILE_ROUTES = """
    [agiproxy]
    listen = 127.0.0.1:0
    header_timeout = 5
    %s
    [pool internal]
    servers = 127.0.0.1:%%d
    [pool other]
    servers = 127.0.0.1:%%d
    [route internal]
    agi_context = ^from-internal$
    pool = internal
    [route app]
    path = app
    rewrite = /app/{agi_callerid}?a=1&cid={agi_callerid}&p={path}
    pool = other
    [route rest]
    path = *
    pool = other
"""


class HostileLimitsTest(SecurityCase):
    """Issue 10: repeated names, rewrite values, dripped headers, regex limits, connection caps."""

    def routes_proxy(self, extra=""):
        internal, other = self.server(), self.server()
        return self.proxy(HOSTILE_ROUTES % extra, internal, other), internal, other

    def test_a_repeated_name_is_badheader(self):
        proxy, internal, other = self.routes_proxy()
        base = trace_header("a-plain")
        for name, line in (("agi_context", b"agi_context: from-internal\nagi_context: from-pstn\n"),
                           ("agi_request", b"agi_request: agi://127.0.0.1/admin/drop\n")):
            LOG.clear()
            data = line + base if name == "agi_context" else base.replace(b"\n\n", b"\n" + line + b"\n")
            sock = socket.create_connection(("127.0.0.1", plain_port(proxy)), TIMEOUT)
            client = local_name(sock)
            sock.sendall(data)
            closed, got, _ = wait_closed(sock, time.monotonic() + TIMEOUT)
            sock.close()
            self.assertTrue(closed)
            self.assertEqual(got, b"", "closed without a word")
            wait_until(lambda: self.warnings_for(client), message="the BADHEADER line")
            self.assertIn("header repeats %s" % name, self.warnings_for(client)[0])
        self.assertEqual((internal.accepted, other.accepted), (0, 0))
        self.assertIdle(proxy)

    def test_rewrite_percent_encodes_header_values(self):
        proxy, internal, other = self.routes_proxy()
        caller = "100&admin=1/../x?y=%"
        sent = agiproxy.synthetic_header("agi://127.0.0.1/app", variables={"agi_callerid": caller})
        self.assertEqual(asterisk(plain_port(proxy), sent).commands, SERVED)
        got = agiproxy.AgiHeader.parse(other.headers[0])
        encoded = "100%26admin%3D1%2F..%2Fx%3Fy%3D%25"
        self.assertEqual(got.get("agi_request"), "agi://127.0.0.1/app/%s?a=1&cid=%s&p=/app" % (encoded, encoded))
        self.assertEqual(got.get("agi_callerid"), caller, "the header itself is forwarded unchanged")
        route = proxy.upstreams.router.routes[1]
        request = agiproxy.parse_request("agi://h/app")
        self.assertEqual(route.rewritten(request, {"agi_callerid": "A-Z_a.z~0 \xe9"}, {}),
                         ("/app/A-Z_a.z~0%20%C3%A9", "a=1&cid=A-Z_a.z~0%20%C3%A9&p=/app"))

    def test_a_dripped_header_is_scanned_in_linear_time(self):
        class Limits(object):
            max_header_bytes, max_header_lines = 1 << 20, 256
        body = b"agi_request: agi://127.0.0.1/" + b"x" * 65536 + b"\nagi_network: yes\n\n"
        for step in (len(body), 1):
            scanner = agiproxy.HeaderScanner(Limits())
            scanner.buffer = CountingBuffer()
            CountingBuffer.examined = 0
            for start in range(0, len(body), step):
                scanner.feed(body[start:start + step])
            self.assertTrue(scanner.done)
            self.assertLessEqual(CountingBuffer.examined, 2 * len(body),
                                 "chunks of %d: find() looked at %d bytes of %d" % (step, CountingBuffer.examined,
                                                                                      len(body)))
            self.assertEqual(scanner.result()[0].get("agi_network"), "yes")

    def test_a_value_longer_than_max_match_length_reaches_no_regex(self):
        proxy, internal, other = self.routes_proxy("max_match_length = 100")
        for context, expected in (("from-internal", internal), ("from-internal" + " " * 100, other)):
            sent = agiproxy.synthetic_header("agi://127.0.0.1/x", variables={"agi_context": context})
            before = len(expected.headers)
            self.assertEqual(asterisk(plain_port(proxy), sent).commands, SERVED)
            self.assertEqual(len(expected.headers), before + 1)
        wait_until(lambda: [m for m in LOG.messages(logging.WARNING)
                            if "agi_context longer than max_match_length = 100" in m], message="the warning")
        self.assertIdle(proxy)

    def test_routing_regexes_run_outside_the_lock(self):
        proxy, internal, other = self.routes_proxy()
        route = proxy.upstreams.router.routes[0]
        held = []

        class Spy(object):
            def __init__(self, regex):
                self.regex, self.pattern = regex, regex.pattern

            def search(self, value):
                held.append(proxy.lock.locked())
                return self.regex.search(value)
        route.conditions = [(name, Spy(regex)) for name, regex in route.conditions]
        sent = agiproxy.synthetic_header("agi://127.0.0.1/x", variables={"agi_context": "from-internal"})
        self.assertEqual(asterisk(plain_port(proxy), sent).commands, SERVED)
        self.assertEqual(len(internal.headers), 1)
        self.assertEqual(held, [False])

    def test_nested_quantifiers_are_warned_of(self):
        config = make_config("""
            [agiproxy]
            [pool a]
            servers = h
            [route slow]
            agi_callerid = ^(\\d+)+$
            match = ^/ivr/(?:\\w+-?)*$
            pool = a
            [route fine]
            agi_callerid = ^\\d+$
            agi_dnid = ^(\\d{3})(\\d+)$
            pool = a
        """)
        warnings = agiproxy.regex_warnings(config)
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("route slow: match = ^/ivr/(?:\\w+-?)*$: the nested quantifier", warnings[0])
        self.assertIn("route slow: agi_callerid = ^(\\d+)+$: the nested quantifier (\\d+)+", warnings[1])

    def test_max_connections_closes_new_connections_at_accept(self):
        upstream = self.server()
        proxy = self.proxy(tls_listener_config("header_timeout = 10\nmax_connections = 4"), upstream)
        port = plain_port(proxy)
        waiting = []
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
            self.addCleanup(sock.close)
            sock.sendall(b"agi_network: yes\n")      # half a header: no slot, a worker waits for the rest
            waiting.append(sock)
        wait_until(lambda: len(proxy.sessions) == 4, message="four connections waiting")
        threads = threading.active_count()
        started = time.monotonic()
        refused = [socket.create_connection(("127.0.0.1", port), TIMEOUT) for _ in range(20)]
        for sock in refused:
            closed, got, _ = wait_closed(sock, time.monotonic() + TIMEOUT)
            sock.close()
            self.assertTrue(closed and got == b"")
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertLessEqual(threading.active_count(), threads, "a refused connection costs no thread")
        text = proxy.metrics()
        self.assertIn('agiproxy_failures_total{reason="REFUSED"} 20\n', text)
        self.assertIn("agiproxy_connections_waiting 4\n", text)
        lines = [m for m in LOG.messages(logging.WARNING) if "max_connections = 4" in m]
        self.assertEqual(len(lines), 10, "rate limited: 10 lines per 10 s")
        for sock in waiting:
            sock.close()
        self.assertIdle(proxy)
        self.assertServes(proxy, upstream=upstream)

    def test_a_sender_the_other_side_does_not_read_pins_at_most_the_buffer_limit(self):
        stalled = threading.Event()
        upstream = self.server(behaviour=lambda conn, header, server: stalled.wait(TIMEOUT))
        self.addCleanup(stalled.set)        # before the server's stop joins its threads
        proxy = self.proxy(BASIC, upstream)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(trace_header("a-plain"))
        wait_until(lambda: upstream.headers, message="the header upstream")
        sock.setblocking(False)
        chunk, deadline = b"x" * 65536, time.monotonic() + TIMEOUT
        links = []
        while not [l for l in links if not l.up.readable()]:     # until the kernel buffers are full too
            self.assertLess(time.monotonic(), deadline, "the proxy never stopped reading")
            try:
                sock.send(chunk)
            except BlockingIOError:
                select.select([], [sock], [], 0.05)
            links = [l for l in list(proxy.relay.links) if l.up is not None]
        self.assertEqual(len(links), 1)
        self.assertLessEqual(len(links[0].up.buffer), agiproxy.RELAY_BUFFER_LIMIT + agiproxy.RELAY_CHUNK)


class HostileConnectTest(PoolCase):
    """Issue 10: one deadline over resolution and every address; emfile is not the server's failure."""

    def fake_names(self, names):
        real = socket.getaddrinfo

        def getaddrinfo(host, *args, **kwargs):
            if host in names:
                return names[host]()
            return real(host, *args, **kwargs)
        socket.getaddrinfo = getaddrinfo
        self.addCleanup(setattr, socket, "getaddrinfo", real)

    def budget_proxy(self, name):
        return self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            connect_timeout = 400ms
            connect_budget = 600ms
            [pool main]
            servers = %s:4573
            [route all]
            path = *
            pool = main
        """ % name)

    def test_a_name_with_three_dead_addresses_costs_the_budget(self):
        holes = [self.black_hole() for _ in range(3)]
        self.fake_names({"three-dead.test": lambda: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", h.port))
                                                     for h in holes]})
        proxy = self.budget_proxy("three-dead.test")
        transcript, elapsed = timed(self.port(proxy))
        self.assertEqual(transcript.status, "NOUPSTREAM")
        self.assertGreater(elapsed, 0.55)
        self.assertLess(elapsed, 1.0, "3 x connect_timeout would be 1.2 s")
        self.assertIdle(proxy)

    def test_a_hung_resolver_costs_the_budget(self):
        release = threading.Event()
        self.addCleanup(release.set)
        self.fake_names({"hung.test": lambda: release.wait(TIMEOUT) and []})
        proxy = self.budget_proxy("hung.test")
        for _ in range(2):          # the second waits for the same lookup: no second thread
            transcript, elapsed = timed(self.port(proxy))
            self.assertEqual(transcript.status, "NOUPSTREAM")
            self.assertLess(elapsed, 1.0)
        self.assertEqual(len([t for t in threading.enumerate() if t.name == "resolve"]), 1)
        self.assertIdle(proxy)

    def test_our_own_shortage_is_overloaded_and_leaves_the_server_alone(self):
        upstream = self.server()
        proxy = self.proxy(BASIC, upstream)
        real = agiproxy.begin_connect

        def out_of_descriptors(*args):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        agiproxy.begin_connect = out_of_descriptors
        self.addCleanup(setattr, agiproxy, "begin_connect", real)
        self.assertEqual(asterisk(self.port(proxy)).status, "OVERLOADED")
        state = self.state(proxy, upstream.port)
        self.assertEqual((state.up, state.connect_failures), (True, 0))
        self.assertTrue(self.log_has("Too many open files (agiproxy is short of it, not the server)"))
        self.assertIn('agiproxy_failures_total{reason="OVERLOADED"} 1\n', proxy.metrics())
        agiproxy.begin_connect = real
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)


class HostileReloadTest(PoolCase):
    """Issue 10: max= across removal and re-adding; a reload does not wait for a check."""

    CONFIG = """
        [agiproxy]
        listen = 127.0.0.1:0
        [pool main]
        check = %s
        check_interval = 50ms
        check_timeout = 1500ms
        servers = 127.0.0.1:%d max=1
        [route all]
        path = *
        pool = main
    """

    def write(self, path, text):
        with open(path, "w") as handle:
            handle.write(textwrap.dedent(text))

    def test_max_holds_when_a_server_is_removed_and_added_back(self):
        held, other = self.server(behaviour=hold_or_answer), self.server()
        proxy = self.proxy(self.CONFIG % ("none", held.port))
        holder = self.hold(proxy, held)
        path = os.path.join(self.tempdir(), "agiproxy.conf")
        self.write(path, self.CONFIG % ("none", other.port))
        self.assertTrue(proxy.reload(path))
        self.write(path, self.CONFIG % ("none", held.port))
        self.assertTrue(proxy.reload(path))
        self.assertEqual(self.state(proxy, held.port).active, 1, "the old session still counts")
        self.assertEqual(asterisk(self.port(proxy), header("x")).status, "BUSY")
        holder.close()
        self.assertIdle(proxy)
        self.assertEqual(asterisk(self.port(proxy), header("x")).commands, [b"ANSWER"])

    def test_a_reload_does_not_wait_for_a_check_under_way(self):
        hole = self.black_hole()
        proxy = self.proxy(self.CONFIG % ("tcp", hole.port))
        checker = proxy.checkers[0]

        def checking():
            frame = sys._current_frames().get(checker.ident)
            while frame is not None:
                if frame.f_code.co_name == "wait_for":
                    return True
                frame = frame.f_back
            return False
        wait_until(checking, message="a check waiting on the black hole")
        path = os.path.join(self.tempdir(), "agiproxy.conf")
        self.write(path, self.CONFIG % ("tcp", hole.port))
        started = time.monotonic()
        self.assertTrue(proxy.reload(path))
        self.assertLess(time.monotonic() - started, 0.75, "check_timeout is 1.5 s")
        self.assertIsNot(proxy.checkers[0], checker)
        checker.join(TIMEOUT)
        self.assertFalse(checker.is_alive())


@unittest.skipUnless(hasattr(os, "killpg"), "needs process groups")
class HostileHookTest(PoolCase):
    """Issue 10: a hook is killed with its children; a failing hook's stderr is logged."""

    def test_a_timed_out_hook_is_killed_with_its_children(self):
        pidfile = os.path.join(self.tempdir(), "child.pid")
        started = time.monotonic()
        agiproxy.run_hook("on_saturation", ["sh", "-c", "sleep 60 & echo $! > %s; echo waiting >&2; wait" % pidfile],
                          0.5)
        self.assertLess(time.monotonic() - started, 3)
        with open(pidfile) as handle:
            pid = int(handle.read())
        wait_until(lambda: process_gone(pid), message="the hook's child to be killed too")
        self.assertTrue(self.log_has("on_saturation hook sh still running after 0.5s: killed with its process "
                                     "group; stderr: waiting"))

    def test_a_failing_hook_logs_the_end_of_its_stderr(self):
        script = "for i in 1 2 3 4 5 6 7; do echo line $i >&2; done; exit 3"
        agiproxy.run_hook("on_recovery", ["sh", "-c", script], 5)
        self.assertTrue(self.log_has("exited with status 3; stderr: line 3 | line 4 | line 5 | line 6 | line 7"))
        LOG.clear()
        agiproxy.run_hook("on_recovery", ["sh", "-c", "exec 2>&-; exit 0"], 5)
        self.assertTrue(self.log_has("on_recovery hook sh -c exec 2>&-; exit 0 done"))


LAX_CA_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = lax
[laxca]
basicConstraints = CA:TRUE
[laxserver]
subjectAltName = IP:127.0.0.1
"""


class HostileTlsTest(SecurityCase):
    """Issue 10: a private CA without strict X.509 extensions verifies on every Python."""

    def test_a_lax_private_ca_verifies_on_every_version(self):
        directory = tempfile.mkdtemp(prefix="agiproxy-lax-")
        self.addCleanup(shutil.rmtree, directory, True)
        with open(os.path.join(directory, "lax.cnf"), "w") as handle:
            handle.write(LAX_CA_CNF)
        newkey = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        openssl(directory, "req", "-x509", "-config", "lax.cnf", "-extensions", "laxca", "-days", "2",
                "-subj", "/CN=lax ca", "-keyout", "ca.key", "-out", "ca.pem", *newkey)
        openssl(directory, "req", "-new", "-config", "lax.cnf", "-subj", "/CN=127.0.0.1",
                "-keyout", "server.key", "-out", "server.csr", *newkey)
        openssl(directory, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-set_serial", "7", "-days", "2", "-extfile", "lax.cnf", "-extensions", "laxserver",
                "-out", "server.pem")
        context = tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        context.load_cert_chain(os.path.join(directory, "server.pem"), os.path.join(directory, "server.key"))
        upstream = self.server(tls_context=context)
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            tls_ca = %s
            servers = 127.0.0.1:%d tls
            [route all]
            path = *
            pool = main
        """ % (os.path.join(directory, "ca.pem"), upstream.port))
        self.assertEqual(asterisk(self.port(proxy)).commands, SERVED)
        self.assertEqual(len(upstream.headers), 1)
        flags = agiproxy.make_client_context(proxy.upstreams.pools["main"].settings, True).verify_flags
        self.assertEqual(flags & agiproxy.VERIFY_FLAGS_SINCE_313, 0)


@unittest.skipUnless(sys.platform.startswith("linux"), "needs /proc and RLIMIT_NOFILE")
class HostileStartupTest(ProgramCase):
    """Issue 10: the start-up line's session estimate, and --check's regex warning."""

    def test_the_start_up_line_estimates_sessions_from_the_descriptors_left(self):
        upstream = self.server()
        self.write_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n" % upstream.port)
        self.stderr = open(os.path.join(self.dir, "stderr"), "wb")
        self.addCleanup(self.stderr.close)
        self.child = subprocess.Popen([sys.executable, PROGRAM, "-c", self.conf], stdin=subprocess.DEVNULL,
                                      stdout=self.stderr, stderr=self.stderr, preexec_fn=low_nofile(64))
        self.addCleanup(self.kill, self.child)
        self.wait_log("listening on")
        line = [l for l in self.log_text().splitlines() if "open-file limit 64" in l][0]
        allowed = int(re.search(r"allows about (\d+) sessions", line).group(1))
        self.assertGreaterEqual(allowed, 15, line)
        self.assertLessEqual(allowed, 28, line)
        self.assertIn("WARNING", line)
        self.assertIn("fewer than a sane floor of 100", line)

    def test_check_warns_of_a_nested_quantifier(self):
        self.write_config("[pool main]\nservers = h\n[route slow]\nagi_callerid = ^(\\d+)+$\npool = main\n")
        status, out, err = self.run_cli("-c", self.conf, "--check")
        self.assertEqual(status, 0)
        self.assertIn("configuration OK", out)
        self.assertIn("warning: route slow: agi_callerid = ^(\\d+)+$: the nested quantifier (\\d+)+", err)


###############################################################################
# Runtime control and the status page (issue 11), a bounded stats endpoint ###
# (issue 10, item 1) ##########################################################
###############################################################################


class AdminStatePureTest(unittest.TestCase):
    """Admin states and run-time weights, without sockets."""

    def test_server_line_options_and_reserve_skips_drain_and_maint(self):
        pool = pool_of(["10.0.0.1 drain", "10.0.0.2 maint", "10.0.0.3"])
        self.assertEqual([m.admin for m in pool.members], ["drain", "maint", "ready"])
        self.assertEqual(pick(pool), "10.0.0.3:4573")
        pool.members[2].state.set_admin("p", agiproxy.DRAIN, 0.0)
        self.assertEqual(pick(pool), agiproxy.NOUPSTREAM)
        pool.members[0].state.set_admin("p", agiproxy.READY, 0.0)
        self.assertEqual(pick(pool), "10.0.0.1:4573")
        with self.assertRaises(agiproxy.ConfigError) as caught:
            pool_of(["10.0.0.1 drained"])
        self.assertIn("drain, maint", str(caught.exception))

    def test_drain_in_one_pool_leaves_another_pool_on_the_same_address(self):
        config = make_config("[agiproxy]\n[pool a]\nservers = 10.0.0.1\n[pool b]\nservers = 10.0.0.1\n")
        upstreams = agiproxy.Upstreams(config)
        a, b = upstreams.pools["a"], upstreams.pools["b"]
        self.assertIs(a.members[0].state, b.members[0].state)
        a.members[0].state.set_admin("a", agiproxy.DRAIN, 0.0)
        self.assertEqual((pick(a), pick(b)), (agiproxy.NOUPSTREAM, "10.0.0.1:4573"))

    def test_ready_gives_a_down_server_its_trial_at_once(self):
        pool = pool_of(["10.0.0.1"], extra="retry_after = 30\nretry_after_max = 30")
        state = pool.members[0].state
        state.mark_down(100.0, "test", 30, 30)
        self.assertEqual(pick(pool, now=101.0), agiproxy.NOUPSTREAM)
        state.set_admin("p", agiproxy.MAINT, 101.0)
        state.set_admin("p", agiproxy.READY, 101.0)
        member, trial = pool.reserve(pool.order({}), [], 101.0)
        self.assertEqual((member.name, trial), ("10.0.0.1:4573", True))

    def test_admin_state_and_run_time_weight_survive_a_reload_unless_the_file_changes_the_weight(self):
        text = "[agiproxy]\n[pool p]\nmode = round-robin\nservers =\n    10.0.0.1 %s\n    10.0.0.2 maint\n"
        old = agiproxy.Upstreams(make_config(text % "weight=2"))
        first, second = old.pools["p"].members
        first.state.set_admin("p", agiproxy.DRAIN, 0.0)
        second.state.set_admin("p", agiproxy.READY, 0.0)    # the file's maint applies to a new server only
        first.set_weight(5)
        new = agiproxy.Upstreams(make_config(text % "weight=2"), previous=old)
        self.assertEqual([(m.admin, m.weight) for m in new.pools["p"].members], [("drain", 5), ("ready", 1)])
        edited = agiproxy.Upstreams(make_config(text % "weight=3"), previous=new)
        self.assertEqual([(m.admin, m.weight) for m in edited.pools["p"].members], [("drain", 3), ("ready", 1)])

    def test_tables_and_ages(self):
        self.assertEqual(agiproxy.format_table(["A", "LONGER"], [["xyz", 1], ["b", 22]]),
                         "A    LONGER\nxyz  1\nb    22\n")
        self.assertEqual([agiproxy.format_age(s) for s in (5, 65, 3700, 90000)], ["5s", "1m05s", "1h01m", "1d01h"])

    def test_http_request_line(self):
        self.assertEqual(agiproxy.parse_http_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
                         ("GET", "/metrics"))
        for bad in (b"GET /\r\n\r\n", b"\x16\x03\x01 junk HTTP/1.1\r\n\r\n", b"GET metrics HTTP/1.1\r\n\r\n",
                    b"SSH-2.0-OpenSSH\r\n\r\n"):
            self.assertRaises(ValueError, agiproxy.parse_http_request, bad)

    def test_stats_acl_default_is_loopback(self):
        settings = make_config("[agiproxy]\n").settings
        allowed = lambda host: agiproxy.network_allowed(host, settings.stats_allow, settings.stats_deny)
        self.assertEqual([allowed(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1", "10.0.0.1",
                                               "::2")], [True, True, True, True, False, False])
        self.assertEqual(make_config("[agiproxy]\nstats_allow =\n").settings.stats_allow, [])

    def test_control_keys_are_checked(self):
        for text, fragment in (("control_socket = run/x.sock", "absolute path"),
                               ("control_socket = /" + "x" * 120, "Unix socket path"),
                               ("control_group = no-such-group-here", "no such group"),
                               ("control_timeout = 0", "more than 0"), ("stats_timeout = 0", "more than 0")):
            with self.assertRaises(agiproxy.ConfigError) as caught:
                make_config("[agiproxy]\n" + text + "\n")
            self.assertIn(fragment, str(caught.exception))
            self.assertIn("<test>:2: [agiproxy]", str(caught.exception))


def child_threads_and_fds(pid):
    with open("/proc/%d/status" % pid) as handle:
        threads = int(re.search(r"(?m)^Threads:\s+(\d+)", handle.read()).group(1))
    return threads, len(os.listdir("/proc/%d/fd" % pid))


def exchange(sock, data, timeout=TIMEOUT):
    """Send *data* on the connected *sock*, return everything it answers until EOF, close it."""
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        sock.close()


def unix_command(path, line, timeout=TIMEOUT):
    """Send raw *line* bytes to the control socket; return everything it answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return exchange(sock, line, timeout)


class ControlCase(ProgramCase):
    """The real program with a control socket (and a stats endpoint) in a child process."""

    def setUp(self):
        ProgramCase.setUp(self)
        self.socket_path = os.path.join(self.dir, "ctl.sock")

    def control_config(self, body, extra=""):
        self.write_config(body, stats=True, extra="control_socket = %s\ncontrol_timeout = 1\nstats_timeout = 1\n%s"
                          % (self.socket_path, textwrap.dedent(extra)))

    def ctl(self, command, expect=0, *options):
        status, out, err = self.run_cli("-c", self.conf, "--ctl", command, *options, timeout=TIMEOUT * 2)
        self.assertEqual(status, expect, "--ctl %r exited %d:\n%s\n%s" % (command, status, out, err))
        return out if expect == 0 else err

    def servers(self):
        """``show servers --json``: 'pool/server' -> its record."""
        pools = json.loads(self.ctl("show servers", 0, "--json"))
        return dict(("%s/%s" % (p["name"], s["name"]), s) for p in pools for s in p["servers"])

    def live(self):
        return json.loads(self.ctl("show sessions", 0, "--json"))


class ControlSocketTest(ControlCase):

    def test_socket_mode_stale_and_live_sockets_removal_and_cli_exit_codes(self):
        upstream = self.server()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.socket_path)
        stale.close()          # what a crash leaves: a socket file nobody listens on
        self.control_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                            % upstream.port)
        self.start()
        self.assertEqual(stat.S_IMODE(os.stat(self.socket_path).st_mode), 0o600)
        self.assertIn("main/127.0.0.1:%d" % upstream.port, self.ctl("show servers"))
        self.assertIn("agiproxy %s" % agiproxy.__version__, self.ctl("show info"))
        self.assertIn("wait server POOL/HOST:PORT empty TIMEOUT", self.ctl("help"))
        # refused: exit 1 and the reason on stderr
        self.assertIn("no pool 'nope'", self.ctl("set server nope/127.0.0.1:1 state drain", 1))
        self.assertIn("no server '127.0.0.1:1' in pool main", self.ctl("set server main/127.0.0.1:1 state drain", 1))
        self.assertIn("state must be ready, drain or maint", self.ctl("set server main/127.0.0.1:%d state off"
                                                                      % upstream.port, 1))
        self.assertIn("unknown command 'frobnicate'", self.ctl("frobnicate", 1))
        self.assertIn("weight must be 1 or more", self.ctl("set server main/127.0.0.1:%d weight 0" % upstream.port,
                                                           1))
        # unreachable: exit 2
        status, _, err = self.run_cli("--socket", os.path.join(self.dir, "none.sock"), "--ctl", "help")
        self.assertEqual(status, 2, err)
        self.assertIn("No such file", err)
        other = os.path.join(self.dir, "other.conf")
        with open(other, "w") as handle:
            handle.write("[agiproxy]\nlisten = 127.0.0.1:0\n")
        status, _, err = self.run_cli("-c", other, "--ctl", "help")
        self.assertEqual((status, "control_socket is not set" in err), (2, True), err)
        # a second proxy on the same live socket: a clear start-up error, and the first keeps its socket
        second = os.path.join(self.dir, "second.conf")
        with open(second, "w") as handle:
            handle.write("[agiproxy]\nlisten = 127.0.0.1:%d\ncontrol_socket = %s\n" % (free_port(), self.socket_path))
        status, _, err = self.run_cli("-c", second)
        self.assertEqual(status, 1, err)
        self.assertIn("control_socket = %s: another process (agiproxy?) is serving it" % self.socket_path, err)
        self.assertNotIn("Traceback", err)
        self.assertIn("ready", self.ctl("show servers"))
        self.signal(signal.SIGTERM)
        self.assertEqual(self.wait_exit(), 0)
        self.assertFalse(os.path.exists(self.socket_path), "the socket file is removed at exit")

    def test_control_group_makes_the_socket_0660(self):
        import grp
        group = grp.getgrgid(os.getgid()).gr_name
        self.control_config("", extra="control_group = %s\n" % group)
        self.start()
        info = os.stat(self.socket_path)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o660, os.getgid()))

    def test_drain_under_load_wait_empty_then_ready(self):
        gate = threading.Event()
        servers = [self.server(behaviour=held_script(gate)) for _ in range(2)]
        a, b = ["main/127.0.0.1:%d" % s.port for s in servers]
        self.control_config("[pool main]\nmode = round-robin\nservers =\n    127.0.0.1:%d\n    127.0.0.1:%d\n"
                            "[route all]\npath = *\npool = main\n" % (servers[0].port, servers[1].port))
        self.start()
        held = [AsteriskThread(self.port, program_header("h%d" % n)) for n in range(4)]
        wait_until(lambda: [len(s.headers) for s in servers] == [2, 2], message="2 held sessions on each server")
        self.assertIn("drain (was ready)", self.ctl("set server %s state drain" % a))
        self.assertIn("still 2 live sessions after 0.2s", self.ctl("wait server %s empty 200ms" % a, 1))
        waiter = subprocess.Popen([sys.executable, PROGRAM, "-c", self.conf, "--ctl", "wait server %s empty 30" % a],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(self.kill, waiter)
        # under load: new sessions all go to b while a's live ones go on untouched
        load = [AsteriskThread(self.port, program_header("n%d" % n)) for n in range(12)]
        wait_until(lambda: len(servers[1].headers) == 14, message="every new session on the ready server")
        self.assertEqual(len(servers[0].headers), 2, "a session reached the drained server")
        self.assertIsNone(waiter.poll(), "wait returned while sessions were live")
        self.assertEqual(self.servers()[a]["admin"], "drain")
        self.assertEqual(sorted(s["server"] for s in self.live()).count(a.split("/")[1]), 2)
        gate.set()
        out, err = waiter.communicate(timeout=TIMEOUT)
        self.assertEqual(waiter.returncode, 0, err)
        self.assertIn("no live session", out)
        for thread in held + load:
            thread.join(TIMEOUT)
            self.assertEqual(thread.result.commands, [b"ANSWER", b"GET VARIABLE CHANNEL"], thread.error)
            self.assertFalse(thread.result.failed)
        self.assertEqual(self.servers()[a]["sessions"], 2)
        self.ctl("set server %s state ready" % a)
        for number in range(4):
            asterisk(self.port, program_header("r%d" % number))
        self.assertEqual([len(s.headers) for s in servers], [4, 16])
        self.assertIn("ready -> drain (control socket)", self.log_text())

    def test_weight_changes_the_split(self):
        servers = [self.server() for _ in range(2)]
        self.control_config("[pool main]\nmode = round-robin\nservers =\n    127.0.0.1:%d\n    127.0.0.1:%d\n"
                            "[route all]\npath = *\npool = main\n" % (servers[0].port, servers[1].port))
        self.start()
        self.assertIn("weight 3 (was 1)", self.ctl("set server main/127.0.0.1:%d weight 3" % servers[0].port))
        for number in range(8):
            asterisk(self.port, program_header("w%d" % number))
        self.assertEqual([len(s.headers) for s in servers], [6, 2])

    def test_maint_stops_checks_states_survive_sighup_and_ready_restarts_them(self):
        servers = [self.server() for _ in range(2)]
        a, b = ["main/127.0.0.1:%d" % s.port for s in servers]
        body = ("[pool main]\ncheck = tcp\ncheck_interval = 100ms\nservers =\n    127.0.0.1:%d\n    127.0.0.1:%d drain\n"
                "[route all]\npath = *\npool = main\n" % (servers[0].port, servers[1].port))
        self.control_config(body)
        self.start()
        self.assertEqual(self.servers()[b]["admin"], "drain")
        wait_until(lambda: servers[0].accepted >= 2 and servers[1].accepted >= 2, message="checks of both")
        self.ctl("set server %s state maint" % a)
        frozen = servers[0].accepted
        start = servers[1].accepted
        wait_until(lambda: servers[1].accepted >= start + 5, message="5 more checks of the other server")
        self.assertLessEqual(servers[0].accepted, frozen + 1, "a server in maint was checked")   # one in flight
        self.control_config(body)          # SIGHUP: the run-time states outlive the reload
        self.signal(signal.SIGHUP)
        self.wait_log("configuration reloaded")
        states = self.servers()
        self.assertEqual((states[a]["admin"], states[b]["admin"]), ("maint", "drain"))
        noupstream = asterisk(self.port, program_header("x"))
        self.assertEqual((noupstream.failed, noupstream.status), (True, "NOUPSTREAM"))
        self.ctl("set server %s state ready" % a)
        frozen = servers[0].accepted
        wait_until(lambda: servers[0].accepted >= frozen + 2, message="checks of the server back to ready")
        self.assertEqual(asterisk(self.port, program_header("y")).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])

    def test_hostile_control_clients_never_block_sessions(self):
        upstream = self.server()
        self.control_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                            % upstream.port)
        self.start()
        self.ctl("show info")
        asterisk(self.port, program_header("warm"))
        base_threads, base_fds = child_threads_and_fds(self.child.pid)
        for line, fragment in ((b"frobnicate\n", b"error: unknown command 'frobnicate'; try help\n"),
                               (b"\n", b"error: empty command; try help\n"),
                               (b"show servers\x00\n", b"error: not a command line"),
                               (b"\xff\xfe\n", b"error: not a command line"),
                               (b"x" * 9000, b"error: line too long\n"),
                               (b"set server main state drain\n", b"error: no server '' in pool main"),
                               (b"show servers please\n", b"error: unknown command"),
                               (b"wait server main/127.0.0.1:%d empty soon\n" % upstream.port, b"error: TIMEOUT:")):
            self.assertTrue(unix_command(self.socket_path, line).startswith(fragment), line)
        # a client that never ends its line is dropped after control_timeout
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(silent.close)
        silent.connect(self.socket_path)
        silent.sendall(b"show serv")
        started = time.monotonic()
        silent.settimeout(TIMEOUT)
        self.assertEqual(silent.recv(100), b"")
        self.assertLess(time.monotonic() - started, 3.0)
        # 1000 clients at once, each sending half a line, while sessions are served
        clients = []
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(self.socket_path)
                sock.send(b"show")
            except OSError:
                pass        # the backlog is full: refused, which is fine
            clients.append(sock)
        self.addCleanup(lambda: [c.close() for c in clients])
        for number in range(20):
            self.assertEqual(asterisk(self.port, program_header("s%d" % number), timeout=5).commands,
                             [b"ANSWER", b"GET VARIABLE CHANNEL"])
        threads, fds = child_threads_and_fds(self.child.pid)
        self.assertLessEqual(threads, base_threads + 2, "a thread per control client")   # +2: warm AGI workers
        self.assertLessEqual(fds, base_fds + agiproxy.CONSOLE_CLIENTS + 2)
        self.assertIn("ready", self.ctl("show servers"))     # an operator still gets in
        for sock in clients:
            sock.close()
        wait_until(lambda: child_threads_and_fds(self.child.pid)[1] <= base_fds, message="descriptors back")
        self.assertIn("control socket: line over 8192 bytes; closed", self.log_text())


class StatsEndpointTest(ControlCase):
    """Issue 10, item 1: the stats endpoint cannot exhaust the proxy; and the status page."""

    def test_half_requests_cost_no_thread_and_are_dropped_at_stats_timeout(self):
        upstream = self.server()
        self.control_config("[pool main]\nservers = 127.0.0.1:%d\n[route all]\npath = *\npool = main\n"
                            % upstream.port)
        self.start()
        self.metrics()
        asterisk(self.port, program_header("warm"))
        base_threads, base_fds = child_threads_and_fds(self.child.pid)
        clients = []
        self.addCleanup(lambda: [c.close() for c in clients])
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", self.stats_port), TIMEOUT)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")      # half a request, for ever
            clients.append(sock)
        started = time.monotonic()
        self.assertEqual(metric_value(self.metrics(), "agiproxy_sessions_total"), 1)   # answered meanwhile
        self.assertEqual(asterisk(self.port, program_header("s")).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        threads, fds = child_threads_and_fds(self.child.pid)
        self.assertLessEqual(threads, base_threads + 2)      # a warm AGI worker or two, not 300 threads
        self.assertLessEqual(fds, base_fds + agiproxy.CONSOLE_CLIENTS + 2)
        last = clients[-1]
        last.settimeout(TIMEOUT)
        self.assertEqual(last.recv(100), b"", "a half request is closed at stats_timeout")
        self.assertLess(time.monotonic() - started, 3.0)
        wait_until(lambda: child_threads_and_fds(self.child.pid)[1] <= base_fds, message="descriptors back")

    def raw_http(self, request):
        return exchange(socket.create_connection(("127.0.0.1", self.stats_port), TIMEOUT), request)

    def test_methods_paths_garbage_and_acl(self):
        self.control_config("", extra="stats_deny = 127.0.0.2\n")
        self.start()
        self.assertTrue(self.raw_http(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 405"))
        self.assertTrue(self.raw_http(b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404"))
        self.assertTrue(self.raw_http(b"\x16\x03\x01\x00\x05hello\n\n").startswith(b"HTTP/1.0 400"))
        self.assertTrue(self.raw_http(b"GET /" + b"a" * 9000).startswith(b"HTTP/1.0 431"))
        head = self.raw_http(b"HEAD /status.json HTTP/1.1\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200") and head.endswith(b"\r\n\r\n"), head)
        denied = socket.socket()
        denied.bind(("127.0.0.2", 0))
        denied.connect(("127.0.0.1", self.stats_port))
        denied.settimeout(TIMEOUT)
        try:
            denied.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            self.assertEqual(denied.recv(100), b"")
        except ConnectionResetError:
            pass
        finally:
            denied.close()
        self.wait_log("127.0.0.2: denied by stats_allow/stats_deny; closed")

    def test_status_json_and_the_page_in_a_real_browser(self):
        up, down = self.server(), dead_port()
        self.control_config("[pool main]\nmode = round-robin\nretry_after = 30\nservers =\n    127.0.0.1:%d\n"
                            "    127.0.0.1:%d\n[route all]\npath = *\npool = main\n" % (up.port, down))
        self.start()
        for number in range(3):
            asterisk(self.port, program_header("p%d" % number))       # one of them marks the dead one down
        self.ctl("set server main/127.0.0.1:%d state drain" % up.port)
        status = json.loads(self.metrics_text("/status.json")[0])
        servers = dict((s["port"], s) for s in status["pools"][0]["servers"])
        self.assertEqual((servers[up.port]["state"], servers[up.port]["admin"]), ("up", "drain"))
        self.assertEqual((servers[down]["state"], servers[down]["admin"]), ("down", "ready"))
        self.assertEqual(servers[down]["failures"], {"connect": 1})
        self.assertEqual(set(status["failures"]), set(agiproxy.REASONS) - {agiproxy.COMPLETED})
        samples = self.metrics()
        self.assertEqual(metric_value(samples, "agiproxy_server_admin_state", pool="main",
                                      server="127.0.0.1:%d" % up.port, state="drain"), 1)
        page, kind = self.metrics_text("/")
        self.assertTrue(kind.startswith("text/html"))
        self.assertNotRegex(page, r'(src|href)="(https?:)?//', "an external resource")
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            if os.environ.get("AGIPROXY_REQUIRE_CHROMIUM") == "1":
                self.fail("AGIPROXY_REQUIRE_CHROMIUM=1 but no chromium on PATH")
            self.skipTest("no chromium here (apt-get install chromium; .ci/run installs it)")
        url = "http://127.0.0.1:%d/" % self.stats_port
        flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--user-data-dir=%s" % os.path.join(self.dir, "chromium")]
        dom = subprocess.run(flags + ["--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=60, universal_newlines=True).stdout
        for port, state, admin in ((up.port, "up", "drain"), (down, "down", "ready")):
            row = re.search(r'<tr class="server" data-server="main/127.0.0.1:%d" data-state="(\w+)" '
                            r'data-admin="(\w+)">(.*?)</tr>' % port, dom)
            self.assertIsNotNone(row, "no row for server %d in the rendered DOM" % port)
            self.assertEqual(row.group(1, 2), (state, admin))
            self.assertIn('<span class="word %s">%s</span>' % (state, state), row.group(3))
        self.assertIn('data-reason="NOUPSTREAM"', dom)
        shots = os.environ.get("AGIPROXY_SCREENSHOTS") or self.dir
        for name, size in (("status-1920.png", "1920,1080"), ("status-phone.png", "390,844")):
            path = os.path.join(shots, name)
            subprocess.run(flags + ["--window-size=%s" % size, "--screenshot=%s" % path, url],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            with open(path, "rb") as handle:
                self.assertEqual(handle.read(8), b"\x89PNG\r\n\x1a\n")


###############################################################################
# Active checks as the FastAGI libraries see them (issue 13, issue 10 item 7) #
###############################################################################

class ActiveCheckInteropTest(unittest.TestCase):
    """Issue 13: check = agi plays Asterisk for one command, check = tcp ends with a reset; issue 10 item 7."""

    def listener(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(TIMEOUT)
        return sock

    def check_in_thread(self, listener, check, path="h13/health"):
        """Run check_server against *listener* in a thread; return (thread, results list)."""
        state = agiproxy.ServerState("127.0.0.1", listener.getsockname()[1], False)
        member = collections.namedtuple("Member", "state tls_context")(state, None)
        settings = collections.namedtuple("Settings", "check check_path check_timeout")(check, path, 2.0)
        results = []
        thread = threading.Thread(target=lambda: results.append(agiproxy.check_server(member, settings)))
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        return thread, results

    @staticmethod
    def read_header(conn):
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = conn.recv(4096)
            if not chunk:
                raise AssertionError("EOF inside the check's header: %r" % data)
            data += chunk
        return data

    @staticmethod
    def read_line(conn):
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                return data
            data += chunk
        return data

    def test_agi_check_answers_the_first_command_like_asterisk_then_hangs_up(self):
        listener = self.listener()
        thread, results = self.check_in_thread(listener, "agi")
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(TIMEOUT)
        header = self.read_header(conn)
        self.assertIn(b"agi_network_script: h13/health\n", header)
        conn.sendall(b"ANSWER\n")
        self.assertEqual(self.read_line(conn), b"200 result=0\n")     # a reply, as pystrix and ding-dong wait for
        self.assertEqual(self.read_line(conn), b"HANGUP\n")
        conn.sendall(b"GET VARIABLE CHANNEL\n")                      # a hung-up channel still answers
        self.assertEqual(self.read_line(conn), agiproxy.DEAD_CHANNEL_REPLY)
        conn.close()
        thread.join(TIMEOUT)
        self.assertEqual(results, [None])

    def test_agi_check_fails_on_failure_line(self):
        listener = self.listener()
        thread, results = self.check_in_thread(listener, "agi")
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(TIMEOUT)
        self.read_header(conn)
        conn.sendall(b"FAILURE\n")          # aioagi's answer for a path it has no handler for
        thread.join(TIMEOUT)
        self.assertEqual(len(results), 1)
        self.assertIsNotNone(results[0])
        self.assertIn("FAILURE", results[0])
        self.assertIn("check_path", results[0])
        self.assertNotIsInstance(results[0], agiproxy.CheckSkipped)

    def test_agi_check_passes_when_the_server_resets_after_the_hangup(self):
        listener = self.listener()
        thread, results = self.check_in_thread(listener, "agi")
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        self.read_header(conn)
        conn.sendall(b"ANSWER\n")
        self.assertEqual(self.read_line(conn), b"200 result=0\n")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        thread.join(TIMEOUT)
        self.assertEqual(results, [None])

    def test_tcp_check_resets_instead_of_an_eof_where_the_header_should_be(self):
        listener = self.listener()
        thread, results = self.check_in_thread(listener, "tcp")
        thread.join(TIMEOUT)
        self.assertEqual(results, [None])
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        conn.settimeout(TIMEOUT)
        # an EOF here (b"") is what spins panoramisk's header loop at 100% CPU
        with self.assertRaises(ConnectionResetError):
            conn.recv(4096)

    def test_check_result_skipped_neither_passes_nor_fails(self):
        proxy = agiproxy.Proxy(agiproxy.parse_config(textwrap.dedent("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            check = tcp
            fall = 1
            rise = 1
            servers = 127.0.0.1:9
            [route all]
            path = *
            pool = main
        """), "<test>"))
        self.addCleanup(proxy.shutdown)
        pool = proxy.upstreams.pools["main"]
        member = pool.members[0]
        for _ in range(3):
            proxy.check_result(pool, member, agiproxy.CheckSkipped("Too many open files"))
        self.assertTrue(member.state.up)
        self.assertEqual(member.state.check_streak, 0)
        proxy.check_result(pool, member, "refused")
        self.assertFalse(member.state.up)
        proxy.check_result(pool, member, agiproxy.CheckSkipped("Too many open files"))
        self.assertFalse(member.state.up)
        self.assertEqual(member.state.check_streak, -1)

    def test_checks_during_fd_exhaustion_do_not_take_the_server_down(self):
        """Issue 10 item 7, in a child proxy with 40 descriptors: its checks hit EMFILE and are skipped."""
        upstream = FakeServer()
        self.addCleanup(upstream.stop)
        child, port, log_text = start_starved_proxy(self, upstream, "log_level = debug", """
            check = tcp
            check_interval = 20ms
            check_timeout = 1
            fall = 2""")
        idle = []
        try:
            for _ in range(EmfileTest.LIMIT + 20):
                idle.append(socket.create_connection(("127.0.0.1", port), TIMEOUT))
            wait_until(lambda: log_text().count("skipped: ") >= 3, message="three checks skipped for EMFILE")
        finally:
            for sock in idle:
                sock.close()
        text = log_text()
        self.assertRegex(text, r"check of 127\.0\.0\.1:%d in pool main skipped: .*[Tt]oo many open files"
                               % upstream.port)
        self.assertNotIn(" is down", text)
        self.assertEqual(asterisk(port, header("x")).commands, SERVED)


###############################################################################
# Pools that follow the fleet: DNS, queue, slow start, agent checks, reroute ##
###############################################################################


def dns_wire_name(name):
    """The uncompressed wire form of *name* (the test's own encoder, not agiproxy's)."""
    return b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".") if label) + b"\0"


def dns_question(query):
    """``(name, qtype, end of the question)`` of a query (uncompressed, as stub resolvers send)."""
    labels, position = [], 12
    while query[position]:
        size = query[position]
        labels.append(query[position + 1:position + 1 + size].decode().lower())
        position += 1 + size
    return ".".join(labels), struct.unpack("!H", query[position + 1:position + 3])[0], position + 5


def dns_reply(query, records=(), rcode=0, truncated=False, ident=None):
    """An answer to *query*: *records* are ``(owner or None for the question's name, type, value)``;
    the owner None is written as a compression pointer to the question."""
    _, _, end = dns_question(query)
    flags = 0x8180 | rcode | (0x0200 if truncated else 0)
    out = struct.pack("!HHHHHH", struct.unpack("!H", query[:2])[0] if ident is None else ident, flags, 1,
                      len(records), 0, 0) + query[12:end]
    for owner, rtype, value in records:
        if rtype == agiproxy.DNS_A:
            data = socket.inet_pton(socket.AF_INET, value)
        elif rtype == agiproxy.DNS_AAAA:
            data = socket.inet_pton(socket.AF_INET6, value)
        elif rtype == agiproxy.DNS_SRV:
            data = struct.pack("!HHH", *value[:3]) + dns_wire_name(value[3])
        else:
            data = dns_wire_name(value)
        out += (b"\xc0\x0c" if owner is None else dns_wire_name(owner)) + \
            struct.pack("!HHIH", rtype, 1, 5, len(data)) + data
    return out


class FakeDns(object):
    """A DNS server on loopback, UDP and TCP on the same port, whose answers the test changes.

    ``answers`` maps ``(name, qtype)`` to a list of records (see dns_reply), an RCODE
    (int), or a function ``(query, transport) -> bytes or None`` (None: no reply).
    Names without an entry get NXDOMAIN.  ``truncate`` makes every UDP answer a bare
    TC=1 message, so clients must ask again over TCP.  ``queries`` records
    ``(transport, name, qtype)``."""

    def __init__(self):
        self.answers = {}
        self.truncate = False
        self.queries = []
        self.lock = threading.Lock()
        for _ in range(20):     # a port free for both UDP and TCP
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.bind(("127.0.0.1", 0))
            self.port = self.tcp.getsockname()[1]
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                self.udp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.tcp.close()
                self.udp.close()
        self.udp.settimeout(0.05)   # close() does not wake recvfrom(): look at stopping now and then
        self.tcp.listen(16)
        self.peer = None
        self.stopping = False
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]
        for thread in self.threads:
            thread.start()

    def set(self, name, qtype, answer):
        with self.lock:
            self.answers[(name, qtype)] = answer

    def answer(self, query, transport):
        name, qtype, _ = dns_question(query)
        with self.lock:
            self.queries.append((transport, name, qtype))
            answer = self.answers.get((name, qtype), 3 if not any(k[0] == name for k in self.answers) else [])
        if callable(answer):
            return answer(query, transport)
        if transport == "udp" and self.truncate:
            return dns_reply(query, truncated=True)
        if isinstance(answer, int):
            return dns_reply(query, rcode=answer)
        return dns_reply(query, answer)

    def _serve_udp(self):
        while not self.stopping:
            try:
                query, self.peer = self.udp.recvfrom(4096)
                reply = self.answer(query, "udp")
                if reply is not None:
                    self.udp.sendto(reply, self.peer)
            except (OSError, IndexError, struct.error):
                if self.stopping:
                    return

    def _serve_tcp(self):
        while not self.stopping:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(TIMEOUT)
                    size = struct.unpack("!H", recv_exactly(conn, 2, time.monotonic() + TIMEOUT))[0]
                    reply = self.answer(recv_exactly(conn, size, time.monotonic() + TIMEOUT), "tcp")
                    if reply is not None:
                        conn.sendall(reply if reply[:2] == b"\xff\xff" else struct.pack("!H", len(reply)) + reply)
                except (OSError, IndexError, struct.error):
                    pass

    def stop(self):
        self.stopping = True
        self.udp.close()
        close_listening(self.tcp)
        for thread in self.threads:
            thread.join(TIMEOUT)


A, AAAA, SRV, CNAME = agiproxy.DNS_A, agiproxy.DNS_AAAA, agiproxy.DNS_SRV, agiproxy.DNS_CNAME


def sample_answer(ident=0x1234, name="agi.example.com"):
    """A valid compressed answer with A, AAAA and SRV records for (ident, name, A)."""
    query = agiproxy.dns_query(ident, name, A)
    return dns_reply(query, [(None, A, "10.0.0.1"), (None, AAAA, "2001:db8::1"), (None, SRV, (1, 2, 4573, name))])


class DnsMessageTest(unittest.TestCase):
    """The DNS message code is pure: queries, answers and resolv.conf without a socket."""

    def test_query_and_answer_round_trip(self):
        query = agiproxy.dns_query(7, "Agi.Example.COM.", A)
        self.assertEqual(dns_question(query)[:2], ("agi.example.com", A))
        self.assertEqual(struct.unpack("!HHHHHH", query[:12]), (7, 0x0100, 1, 0, 0, 0))
        answer = agiproxy.parse_dns_answer(sample_answer(7), 7, "agi.example.com", A)
        self.assertEqual(answer.rcode, 0)
        self.assertFalse(answer.truncated)
        self.assertEqual(answer.records, [("agi.example.com", A, "10.0.0.1"), ("agi.example.com", AAAA, "2001:db8::1"),
                                          ("agi.example.com", SRV, (1, 2, 4573, "agi.example.com"))])

    def test_cname_chain_is_followed_and_bounded(self):
        query = agiproxy.dns_query(1, "a.example", A)
        records = agiproxy.parse_dns_answer(dns_reply(query, [(None, CNAME, "b.example"), ("b.example", CNAME, "c.example"),
                                                               ("c.example", A, "10.0.0.3"), ("x.example", A, "10.9.9.9")]),
                                            1, "a.example", A).records
        self.assertEqual(agiproxy.dns_values(records, "a.example", A), ["10.0.0.3"])
        looping = [("a.example", CNAME, "b.example"), ("b.example", CNAME, "a.example")]
        self.assertRaises(agiproxy.DnsError, agiproxy.dns_values, looping, "a.example", A)
        long_chain = [("n%d.example" % i, CNAME, "n%d.example" % (i + 1)) for i in range(20)]
        self.assertRaises(agiproxy.DnsError, agiproxy.dns_values, long_chain, "n0.example", A)

    def test_wrong_id_question_or_flags_is_a_mismatch(self):
        good = sample_answer(5)
        parse = agiproxy.parse_dns_answer
        self.assertRaises(agiproxy.DnsMismatch, parse, good, 6, "agi.example.com", A)
        self.assertRaises(agiproxy.DnsMismatch, parse, good, 5, "other.example.com", A)
        self.assertRaises(agiproxy.DnsMismatch, parse, good, 5, "agi.example.com", AAAA)
        self.assertRaises(agiproxy.DnsMismatch, parse, good[:2] + b"\x01\x00" + good[4:], 5, "agi.example.com", A)
        self.assertRaises(agiproxy.DnsMismatch, parse, good[:4] + b"\x00\x02" + good[6:], 5, "agi.example.com", A)

    def test_rcode_and_truncation_are_reported(self):
        query = agiproxy.dns_query(9, "gone.example", SRV)
        self.assertEqual(agiproxy.parse_dns_answer(dns_reply(query, rcode=3), 9, "gone.example", SRV),
                         (3, False, []))
        self.assertEqual(agiproxy.parse_dns_answer(dns_reply(query, truncated=True), 9, "gone.example", SRV),
                         (0, True, []))

    def test_compression_loops_and_forward_pointers_are_refused(self):
        query = agiproxy.dns_query(3, "x.example", A)
        head = dns_reply(query)[:-0 or None]
        base = bytearray(head)
        base[7] = 1     # one answer
        offset = len(base)
        for owner in (struct.pack("!H", 0xC000 | offset),               # points at itself
                      struct.pack("!H", 0xC000 | (offset + 2)) + b"\xc0\x0c",   # forward
                      b"\x01a" + struct.pack("!H", 0xC000 | offset),    # label then back to its own start
                      b"\x40" + b"a" * 64,                               # label type 01
                      b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\0"):
            message = bytes(base) + owner + struct.pack("!HHIH", A, 1, 5, 4) + b"\x0a\0\0\x01"
            with self.assertRaises(agiproxy.DnsError, msg=repr(owner[:8])):
                agiproxy.parse_dns_answer(message, 3, "x.example", A)

    def test_every_cut_of_an_answer_is_a_clean_error(self):
        good = sample_answer(11)
        for size in range(len(good)):
            try:
                agiproxy.parse_dns_answer(good[:size], 11, "agi.example.com", A)
            except agiproxy.DnsError:
                continue
            self.fail("a cut at %d of %d bytes parsed" % (size, len(good)))

    def test_record_counts_and_record_sizes_are_bounded(self):
        query = agiproxy.dns_query(4, "many.example", A)
        many = dns_reply(query, [(None, A, "10.0.0.1")] * (agiproxy.DNS_MAX_RECORDS + 1))
        self.assertRaises(agiproxy.DnsError, agiproxy.parse_dns_answer, many, 4, "many.example", A)
        odd = dns_reply(query, [(None, A, "10.0.0.1")])[:-6] + struct.pack("!H", 5) + b"\x0a\0\0\x01\x01"
        self.assertRaises(agiproxy.DnsError, agiproxy.parse_dns_answer, odd, 4, "many.example", A)
        self.assertRaises(agiproxy.DnsError, agiproxy.encode_dns_name, "a" * 64 + ".example")
        self.assertRaises(agiproxy.DnsError, agiproxy.encode_dns_name, ".".join(["abcdefgh"] * 30))

    def test_fuzzed_answers_raise_only_dns_errors(self):
        seed = int(os.environ.get("AGIPROXY_FUZZ_SEED", random.randrange(2 ** 32)))
        rng = random.Random(seed)
        good = sample_answer(0x4242)
        rounds = 200000 if SOAK else 20000
        started = time.monotonic()
        outcomes = collections.Counter()
        for _ in range(rounds):
            message = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                kind = rng.random()
                position = rng.randrange(len(message))
                if kind < 0.6:
                    message[position] = rng.randrange(256)
                elif kind < 0.8:
                    message[position] = 0xC0 | rng.randrange(4)
                    if position + 1 < len(message):
                        message[position + 1] = rng.randrange(256)
                elif kind < 0.9:
                    del message[position:position + rng.randint(1, 8)]
                else:
                    message[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            try:
                answer = agiproxy.parse_dns_answer(bytes(message), 0x4242, "agi.example.com", A)
                agiproxy.dns_values(answer.records, "agi.example.com", A)
                outcomes["parsed"] += 1
            except agiproxy.DnsMismatch:
                outcomes["mismatch"] += 1
            except agiproxy.DnsError:
                outcomes["error"] += 1
            except Exception as exc:
                self.fail("seed %d: %r raised %r" % (seed, bytes(message), exc))
        elapsed = time.monotonic() - started
        sys.stderr.write("\n[dns fuzz seed %d] %d answers in %.2fs: %s " % (seed, rounds, elapsed, dict(outcomes)))
        self.assertLess(elapsed / rounds, 0.001)
        self.assertTrue(outcomes["parsed"] and outcomes["error"])

    def test_resolv_conf(self):
        parse = agiproxy.parse_resolv_conf
        self.assertEqual(parse(""), ([("127.0.0.1", 53)], 5.0, 2))
        text = ("# generated\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n"
                "nameserver not-an-ip\nnameserver 10.0.0.2 ; comment\nnameserver 10.0.0.3\n"
                "options ndots:5 timeout:1 attempts:9\noptions timeout:x\n")
        self.assertEqual(parse(text), ([("10.96.0.10", 53), ("fe80::1%eth0", 53), ("10.0.0.2", 53)], 1.0, 5))
        self.assertEqual(parse("options timeout:0 attempts:0\n")[1:], (1.0, 1))


class DnsClientTest(unittest.TestCase):
    """The client against a real DNS server on loopback, honest and hostile."""

    def setUp(self):
        self.dns = FakeDns()
        self.addCleanup(self.dns.stop)

    def client(self, timeout=0.3, attempts=2, servers=None):
        return agiproxy.DnsClient(servers or [("127.0.0.1", self.dns.port)], timeout, attempts)

    def test_addresses_over_udp(self):
        self.dns.set("agi.test", A, [(None, A, "127.0.0.2"), (None, A, "127.0.0.1")])
        self.dns.set("agi.test", AAAA, [(None, AAAA, "::1")])
        self.assertEqual(self.client().addresses("agi.test"), ["127.0.0.1", "127.0.0.2", "::1"])
        self.assertEqual([q[0] for q in self.dns.queries], ["udp", "udp"])

    def test_truncated_answer_is_asked_again_over_tcp(self):
        self.dns.truncate = True
        self.dns.set("_agi._tcp.test", SRV, [(None, SRV, (10, 5, 4600, "a.test"))])
        self.assertEqual(self.client().query("_agi._tcp.test", SRV), [(10, 5, 4600, "a.test")])
        self.assertEqual([q[0] for q in self.dns.queries], ["udp", "tcp"])

    def forging(self, *extra):
        """An answer function that first sends a forged ID and a forged question (and *extra*)."""
        def answer(query, transport):
            ident = struct.unpack("!H", query[:2])[0]
            for forged in (dns_reply(query, [(None, A, "6.6.6.6")], ident=ident ^ 1),
                           dns_reply(agiproxy.dns_query(ident, "evil.test", A), [(None, A, "6.6.6.7")])) + extra:
                self.dns.udp.sendto(forged, self.dns.peer)
            return dns_reply(query, [(None, A, "127.0.0.9")])
        return answer

    def test_wrong_id_and_wrong_question_are_ignored_until_the_real_answer(self):
        self.dns.set("agi.test", A, self.forging())
        self.assertEqual(self.client().query("agi.test", A), ["127.0.0.9"])
        self.dns.set("agi.test", A, self.forging(b"\x00"))    # garbage is not skipped: this try failed
        with self.assertRaises(agiproxy.DnsError):
            self.client(attempts=1).query("agi.test", A)

    def test_nxdomain_is_an_answer_and_servfail_tries_every_attempt(self):
        self.assertRaises(agiproxy.DnsNameError, self.client().query, "nothing.test", A)
        self.assertEqual(len(self.dns.queries), 1)
        self.dns.set("broken.test", A, 2)
        with self.assertRaises(agiproxy.DnsError) as caught:
            self.client(attempts=3).query("broken.test", A)
        self.assertIn("SERVFAIL", str(caught.exception))
        self.assertEqual(len(self.dns.queries), 4)

    def test_no_reply_times_out_within_timeout_times_attempts(self):
        self.dns.set("silent.test", A, lambda query, transport: None)
        started = time.monotonic()
        with self.assertRaises(agiproxy.DnsError) as caught:
            self.client(timeout=0.2, attempts=2).query("silent.test", A)
        elapsed = time.monotonic() - started
        self.assertIn("timed out", str(caught.exception))
        self.assertGreater(elapsed, 0.35)
        self.assertLess(elapsed, 2.0)

    def test_second_nameserver_answers_when_the_first_is_dead(self):
        self.dns.set("agi.test", A, [(None, A, "127.0.0.5")])
        client = self.client(timeout=0.2, attempts=1, servers=[("127.0.0.1", dead_udp_port()),
                                                               ("127.0.0.1", self.dns.port)])
        self.assertEqual(client.query("agi.test", A), ["127.0.0.5"])

    def test_hostile_tcp_answers(self):
        self.dns.truncate = True
        self.dns.set("cut.test", A, lambda query, transport:
                     dns_reply(query, truncated=True) if transport == "udp" else b"\xff\xff" + b"\0" * 100)
        self.assertRaises(agiproxy.DnsError, self.client().query, "cut.test", A)
        self.dns.set("garbage.test", A, lambda query, transport: query[:2] + b"\x81\x80" + b"\xff" * 40)
        self.assertRaises(agiproxy.DnsError, self.client().query, "garbage.test", A)
        self.dns.truncate = False
        self.dns.set("big.test", A, [(None, A, "10.0.0.1")] * 400)      # 6 KB in one datagram
        self.assertRaises(agiproxy.DnsError, self.client().query, "big.test", A)
        self.dns.set("tc.test", A, lambda query, transport: dns_reply(query, truncated=True))
        with self.assertRaises(agiproxy.DnsError) as caught:
            self.client().query("tc.test", A)
        self.assertIn("truncated answer over TCP", str(caught.exception))


def dead_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FleetCase(PoolCase):
    """A proxy whose pools may take servers from a FakeDns."""

    def fake_dns(self):
        dns = FakeDns()
        self.addCleanup(dns.stop)
        return dns

    @staticmethod
    def members(proxy, pool="main"):
        with proxy.lock:
            return sorted(m.name for m in proxy.upstreams.pools[pool].members)

    @staticmethod
    def served_by(*servers):
        return [len(s.headers) for s in servers]

    def config(self, dns, line, extra=""):
        """A proxy configuration whose pool main has the server *line*, looked up at *dns*."""
        return """
            [agiproxy]
            listen = 127.0.0.1:0
            dns_servers = 127.0.0.1:%d
            [pool main]
            resolve_interval = 0.1
            %s
            servers =
                %s
            [route all]
            path = *
            pool = main
        """ % (dns.port, extra, line)


class DiscoveryTest(FleetCase):
    """Part 1: servers from resolve and srv lines follow DNS, with sessions in flight."""

    def test_resolve_membership_follows_dns_with_a_session_in_flight(self):
        first = self.server(behaviour=hold_or_answer)
        second = self.server(behaviour=hold_or_answer, host="127.0.0.2", port=first.port)
        dns = self.fake_dns()
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.1")])
        proxy = self.proxy(self.config(dns, "agi.fleet.test:%d resolve max=5" % first.port))
        wait_until(lambda: self.members(proxy) == [first.address], message="the first lookup")
        held = self.hold(proxy, first)
        changed = time.monotonic()
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.2")])
        wait_until(lambda: self.members(proxy) == [second.address], message="the pool to follow DNS")
        latency = time.monotonic() - changed
        sys.stderr.write("\n[membership change %.0f ms after the DNS change, resolve_interval 100 ms] " % (latency * 1000))
        self.assertEqual(asterisk(self.port(proxy), header("x")).commands, [b"ANSWER"])
        self.assertEqual(self.served_by(first, second), [1, 1])
        self.assertEqual(self.state(proxy, first.port).active, 1)     # the removed server finishes its session
        held.sendall(b"200 result=0\n")
        held.close()
        self.assertIdle(proxy)
        self.assertTrue(self.log_has("server %s leaves" % first.address))
        self.assertTrue(self.log_has("server %s joins" % second.address))
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.1"), (None, A, "127.0.0.2")])
        wait_until(lambda: self.members(proxy) == [first.address, second.address], message="both")

    def test_failed_lookup_keeps_the_last_good_set_and_logs_once(self):
        upstream = self.server()
        dns = self.fake_dns()
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.1")])
        proxy = self.proxy(self.config(dns, "agi.fleet.test:%d resolve" % upstream.port))
        wait_until(lambda: self.members(proxy) == [upstream.address], message="the first lookup")
        for answer in (2, lambda query, transport: b"\0\0garbage", []):
            count = len(dns.queries)
            dns.set("agi.fleet.test", A, answer)
            wait_until(lambda: len(dns.queries) > count + 4, message="lookups to fail")
            self.assertEqual(self.members(proxy), [upstream.address])
            self.assertEqual(asterisk(self.port(proxy)).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])
        failures = [m for m in LOG.messages() if "lookup of resolve agi.fleet.test failed" in m]
        self.assertEqual(len(failures), 1, failures)        # one outage, one line
        self.assertIn("keeping its 1 servers", failures[0])
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.1")])
        wait_until(lambda: self.log_has("lookup of resolve agi.fleet.test works again"), message="recovery")
        dns.set("agi.fleet.test", A, 3)
        wait_until(lambda: self.log_has("no such name (NXDOMAIN)"), message="the next outage to be logged")
        self.assertEqual(self.members(proxy), [upstream.address])

    def test_srv_priority_weight_and_port(self):
        primary, other, backup = self.server(), self.server(), self.server()
        dns = self.fake_dns()
        dns.truncate = True         # and over TCP
        dns.set("_agi._tcp.fleet.test", SRV, [(None, SRV, (10, 3, primary.port, "a.fleet.test")),
                                              (None, SRV, (10, 1, other.port, "a.fleet.test")),
                                              (None, SRV, (20, 1, backup.port, "b.fleet.test")),
                                              (None, SRV, (30, 1, 9, "."))])
        dns.set("a.fleet.test", A, [(None, A, "127.0.0.1")])
        dns.set("b.fleet.test", A, [(None, CNAME, "c.fleet.test"), ("c.fleet.test", A, "127.0.0.1")])
        dns.set("c.fleet.test", A, [])
        proxy = self.proxy(self.config(dns, "srv _agi._tcp.fleet.test", "mode = round-robin"))
        wait_until(lambda: len(self.members(proxy)) == 3, message="the SRV lookup")
        with proxy.lock:
            found = [(m.state.port, m.weight, m.backup) for m in proxy.upstreams.pools["main"].members]
        self.assertEqual(sorted(found), sorted([(primary.port, 3, False), (other.port, 1, False),
                                                (backup.port, 1, True)]))
        for _ in range(8):
            asterisk(self.port(proxy))
        self.assertEqual(self.served_by(primary, other, backup), [6, 2, 0])
        dns.set("_agi._tcp.fleet.test", SRV, [(None, SRV, (20, 1, backup.port, "b.fleet.test"))])
        wait_until(lambda: len(self.members(proxy)) == 1, message="the pool to shrink")
        asterisk(self.port(proxy))
        self.assertEqual(self.served_by(primary, other, backup), [6, 2, 1])

    def test_explain_and_check_show_what_the_names_resolve_to(self):
        dns = self.fake_dns()
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.7")])
        config = make_config(self.config(dns, "agi.fleet.test:4600 resolve\n                srv _x._tcp.fleet.test"))
        out = io.StringIO()
        self.assertEqual(agiproxy.explain(config, "agi://pbx/x", out=out), 0)
        self.assertIn("dns:      pool main: resolve agi.fleet.test -> 127.0.0.7:4600 weight=1", out.getvalue())
        self.assertIn("srv _x._tcp.fleet.test: lookup failed: _x._tcp.fleet.test: no such name (NXDOMAIN)",
                      out.getvalue())
        self.assertIn("server 1: 127.0.0.7:4600", out.getvalue())
        config = make_config(self.config(dns, "agi.fleet.test:4600 resolve agent_port=4700",
                                         "queue_timeout = 2\n            slowstart = 30s"))
        out = io.StringIO()
        agiproxy.explain(config, "agi://pbx/x", out=out)
        self.assertIn("pool:     main (mode failover; queue_timeout = 2s, max_queue = 100; slowstart = 30s; "
                      "agent every 5s)", out.getvalue())

    def test_check_prints_what_names_resolve_to(self):
        dns = self.fake_dns()
        dns.set("_agi._tcp.fleet.test", SRV, [(None, SRV, (1, 0, 4600, "a.fleet.test"))])
        dns.set("a.fleet.test", A, [(None, A, "127.0.0.8")])
        path = os.path.join(self.tempdir(), "agiproxy.conf")
        with open(path, "w") as handle:
            handle.write(textwrap.dedent(self.config(dns, "srv _agi._tcp.fleet.test")))
        out = subprocess.check_output([sys.executable, PROGRAM, "-c", path, "--check"], timeout=TIMEOUT)
        self.assertIn(b"dns:      pool main: srv _agi._tcp.fleet.test -> 127.0.0.8:4600 weight=1\n", out)

    def test_reload_keeps_the_servers_dns_gave(self):
        upstream = self.server()
        dns = self.fake_dns()
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.1")])
        text = textwrap.dedent(self.config(dns, "agi.fleet.test:%d resolve" % upstream.port))
        path = os.path.join(self.tempdir(), "agiproxy.conf")
        with open(path, "w") as handle:
            handle.write(text.replace("resolve_interval = 0.1", "resolve_interval = 1h"))
        proxy = self.proxy(text.replace("resolve_interval = 0.1", "resolve_interval = 1h"))
        wait_until(lambda: self.members(proxy) == [upstream.address], message="the first lookup")
        dns.set("agi.fleet.test", A, lambda query, transport: None)     # DNS goes silent
        self.assertTrue(proxy.reload(path))
        self.assertEqual(self.members(proxy), [upstream.address])
        self.assertEqual(asterisk(self.port(proxy)).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])

    def test_config_errors(self):
        for line, fragment in (("10.0.0.1:4573 resolve", "resolve needs a host name"),
                               ("srv _agi._tcp.x weight=2", "weight does not apply to a srv line"),
                               ("srv", "srv needs a DNS name"),
                               ("agi.x resolve agent_port=70000", "port number up to 65535")):
            with self.assertRaises(agiproxy.ConfigError) as caught:
                make_config("[agiproxy]\n[pool p]\nservers = %s\n" % line)
            self.assertIn(fragment, str(caught.exception))


def gated_script(gate):
    """A behaviour that waits for *gate* before its one command, so a session holds its slot."""
    def behaviour(conn, header, server):
        gate.wait(TIMEOUT)
        server.run_script(conn, ("ANSWER",))
    return behaviour


class QueueTest(FleetCase):
    """Part 2: at saturation sessions wait in arrival order, up to queue_timeout, then BUSY."""

    CONFIG = """
        [agiproxy]
        listen = 127.0.0.1:0
        connect_timeout = 0.5
        connect_budget = 0.5
        [pool main]
        queue_timeout = %s
        max_queue = %d
        servers = 127.0.0.1:%d max=1
        [pool other]
        servers = 127.0.0.1:%d
        [route other]
        path = other
        pool = other
        [route all]
        path = *
        pool = main
    """

    def queued(self, proxy):
        with proxy.lock:
            return len(proxy.upstreams.pools["main"].state.queue)

    def test_sessions_are_served_in_arrival_order_after_waiting(self):
        upstream = self.server(behaviour=hold_or_answer)
        other = self.server()
        proxy = self.proxy(self.CONFIG % ("5", 10, upstream.port, other.port))
        holder = self.hold(proxy, upstream)
        results = {}
        threads = []
        for number in range(4):
            thread = threading.Thread(target=lambda n=number: results.__setitem__(
                n, asterisk(self.port(proxy), header("q%d" % n))))
            thread.start()
            threads.append(thread)
            wait_until(lambda: self.queued(proxy) == number + 1, message="session %d to queue" % number)
        started = time.monotonic()
        self.assertEqual(asterisk(self.port(proxy), header("other")).commands[0], b"ANSWER")   # not blocked
        self.assertLess(time.monotonic() - started, 1.0)
        time.sleep(0.6)     # longer than connect_budget: the queue's time must not count against it
        holder.close()
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual([results[n].commands for n in range(4)], [[b"ANSWER"]] * 4)
        paths = [re.search(rb"agi_request: \S+/(\w+)", h).group(1) for h in upstream.headers[1:]]
        self.assertEqual(paths, [b"q0", b"q1", b"q2", b"q3"])
        self.assertIdle(proxy)
        samples = parse_prometheus(proxy.metrics())[1]
        self.assertEqual(metric_value(samples, "agiproxy_pool_queued_seconds_count", pool="main"), 4)
        self.assertEqual(metric_value(samples, "agiproxy_pool_queue_timeouts_total", pool="main"), 0)
        self.assertEqual(metric_value(samples, "agiproxy_pool_queue_length", pool="main"), 0)

    def test_queue_timeout_gives_busy_and_max_queue_busy_at_once(self):
        upstream = self.server(behaviour=hold_or_answer)
        other = self.server()
        proxy = self.proxy(self.CONFIG % ("0.4", 1, upstream.port, other.port))
        holder = self.hold(proxy, upstream)
        result = []
        waiting = threading.Thread(target=lambda: result.append(timed(self.port(proxy), header("q"))))
        waiting.start()
        wait_until(lambda: self.queued(proxy) == 1, message="one session to queue")
        (transcript, elapsed) = timed(self.port(proxy), header("full"))
        self.assertEqual(transcript.status, "BUSY")
        self.assertLess(elapsed, 0.3)
        waiting.join(TIMEOUT)
        self.assertEqual(result[0][0].status, "BUSY")
        self.assertGreater(result[0][1], 0.35)
        self.assertLess(result[0][1], 2.0)
        self.assertTrue(self.log_has("queue_timeout = 0.4s"))
        samples = parse_prometheus(proxy.metrics())[1]
        self.assertEqual(metric_value(samples, "agiproxy_pool_queue_timeouts_total", pool="main"), 1)
        holder.close()
        self.assertIdle(proxy)

    def test_caller_who_hangs_up_leaves_the_queue(self):
        upstream = self.server(behaviour=hold_or_answer)
        other = self.server()
        proxy = self.proxy(self.CONFIG % ("30", 10, upstream.port, other.port))
        holder = self.hold(proxy, upstream)
        for goodbye in (b"HANGUP\n", b""):
            sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
            self.addCleanup(sock.close)
            sock.sendall(header("gone"))
            wait_until(lambda: self.queued(proxy) == 1, message="a session to queue")
            if goodbye:
                sock.sendall(goodbye)
            else:
                sock.shutdown(socket.SHUT_WR)
            wait_until(lambda: self.queued(proxy) == 0, message="the caller to leave the queue", timeout=2)
            self.assertTrue(expect_eof(sock, time.monotonic() + TIMEOUT))
            sock.close()
        wait_until(lambda: self.log_has("Asterisk hung up while queued"), message="the access log")
        self.assertTrue(any("end=CLIENTLOST" in m for m in LOG.messages()))
        holder.close()
        self.assertIdle(proxy)
        self.assertEqual(len(upstream.headers), 1)      # the server never saw them
        samples = parse_prometheus(proxy.metrics())[1]
        self.assertEqual(metric_value(samples, "agiproxy_pool_queue_timeouts_total", pool="main"), 0)

    def test_queued_session_is_aborted_by_shutdown(self):
        upstream = self.server(behaviour=hold_or_answer)
        proxy = self.proxy(self.CONFIG % ("30", 10, upstream.port, upstream.port))
        self.hold(proxy, upstream)
        sock = socket.create_connection(("127.0.0.1", self.port(proxy)), TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(header("q"))
        wait_until(lambda: self.queued(proxy) == 1, message="a session to queue")
        started = time.monotonic()
        proxy.abort_sessions("test")
        wait_until(lambda: self.queued(proxy) == 0, message="the queued session to leave", timeout=2)
        self.assertLess(time.monotonic() - started, 2)


class SlowStartTest(FleetCase):
    """Part 3: a returning or joining server's share grows linearly over slowstart."""

    def test_share_grows_linearly_in_each_mode(self):
        limited = pool_of(["10.0.0.1 max=100"], "failover", "slowstart = 10").members[0]
        limited.state.up_since = 0.0
        self.assertEqual([limited.limit(now, 10) for now in (0.0, 2.5, 5.0, 10.0)], [5, 25, 50, 100])
        for mode in ("round-robin", "least-sessions", "hash", "failover"):
            pool = pool_of(["10.0.0.1", "10.0.0.2"], mode, "slowstart = 10")
            pool.random.seed(1)
            fresh = pool.members[0]
            fresh.state.up_since = 0.0
            shares = []
            for now in (0.0, 5.0, 10.0):
                counts = collections.Counter()
                for number in range(2000):
                    member, _ = pool.reserve(pool.order({"agi_uniqueid": str(number)}, "", now), [], now)
                    counts[member.name] += 1
                    if mode != "least-sessions":    # least-sessions shares the sessions it holds
                        member.state.active -= 1
                for member in pool.members:
                    member.state.active = 0
                shares.append(counts[fresh.name] / 2000.0)
            sys.stderr.write("\n[slow start %s: share of the returning server at 0/50/100%% of slowstart: %s] "
                             % (mode, " ".join("%.3f" % share for share in shares)))
            expected = (0.05 / 1.05, 0.5 / 1.5, 0.5) if mode != "failover" else (0.05, 0.5, 1.0)
            for share, wanted in zip(shares, expected):
                self.assertAlmostEqual(share, wanted, delta=0.05, msg="%s %s" % (mode, shares))

    def test_server_back_from_its_trial_starts_slowly(self):
        upstream = self.closable()
        steady = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            mode = round-robin
            slowstart = 30
            retry_after = 0.05
            servers =
                127.0.0.1:%d
                127.0.0.1:%d
            [route all]
            path = *
            pool = main
        """, upstream, steady)
        close_listener(upstream)
        asterisk(self.port(proxy))
        wait_until(lambda: not self.state(proxy, upstream.port).up, message="the server to go down")
        reopen_listener(upstream)
        wait_until(lambda: asterisk(self.port(proxy)) and self.state(proxy, upstream.port).up,
                   message="its trial to bring it back")
        before = len(upstream.headers)
        for _ in range(40):
            asterisk(self.port(proxy))
        self.assertLessEqual(len(upstream.headers) - before, 4)     # ~5% of 40, not half


class SlowStartJoinTest(FleetCase):
    """Part 3 with part 1: a server that joins from DNS starts slowly; the first lookup's do not."""

    def test_joining_server_starts_slowly(self):
        first = self.server()
        joining = self.server(host="127.0.0.2", port=first.port)
        dns = self.fake_dns()
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.1")])
        proxy = self.proxy(self.config(dns, "agi.fleet.test:%d resolve" % first.port,
                                       "mode = round-robin\n            slowstart = 30"))
        wait_until(lambda: self.members(proxy) == [first.address], message="the first lookup")
        with proxy.lock:
            self.assertEqual(proxy.upstreams.pools["main"].members[0].ramp(time.monotonic(), 30), 1.0)
        dns.set("agi.fleet.test", A, [(None, A, "127.0.0.1"), (None, A, "127.0.0.2")])
        wait_until(lambda: len(self.members(proxy)) == 2, message="the second server to join")
        for _ in range(40):
            asterisk(self.port(proxy))
        share = len(joining.headers) / 40.0
        sys.stderr.write("\n[slow start: a server joined from DNS took %.1f%% of 40 sessions in its first "
                         "seconds of slowstart = 30s] " % (share * 100))
        self.assertGreaterEqual(len(joining.headers), 1)
        self.assertLessEqual(len(joining.headers), 4)


class FakeAgent(object):
    """An agent-check port: each connection gets ``line`` and is closed."""

    def __init__(self):
        self.line = b"up\n"
        self.asked = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(self.line)
                except OSError:
                    pass
            self.asked += 1

    def stop(self):
        close_listening(self.sock)
        self.thread.join(TIMEOUT)


class AgentCheckTest(FleetCase):
    """Part 4: the application says how it is, in HAProxy's agent-check format."""

    def test_agent_lines(self):
        parse, Report = agiproxy.parse_agent_line, agiproxy.AgentReport
        self.assertEqual(parse("up"), Report())
        self.assertEqual(parse("drain"), Report("drain"))
        self.assertEqual(parse("75%"), Report("up", 0.75))
        self.assertEqual(parse("ready,50% maxconn:10\r"), Report("up", 0.5, 10))
        self.assertEqual(parse("down #db unreachable"), Report("down"))
        self.assertEqual(parse("maint", Report("up", 0.5, 10)), Report("maint", 0.5, 10))
        self.assertEqual(parse("stopped"), Report("down"))
        for bad in ("", "sideways", "101 %", "300%", "maxconn:x", "up 50"):
            self.assertRaises(ValueError, parse, bad)

    def test_agent_drains_weights_and_limits_a_server(self):
        agent = FakeAgent()
        self.addCleanup(agent.stop)
        first, second = self.server(behaviour=hold_or_answer), self.server(behaviour=hold_or_answer)
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            mode = round-robin
            agent_interval = 0.05
            servers =
                127.0.0.1:%d agent_port=%d
                127.0.0.1:%d
            [route all]
            path = *
            pool = main
        """ % (first.port, agent.port, second.port))

        def says(line, expected, logged=None):
            agent.line = line
            if logged:      # an answer that changes nothing: wait for its log line
                wait_until(lambda: self.log_has(logged), message="the answer to be logged")
            wait_until(lambda: self.state(proxy, first.port).agent == expected, message="%s to apply" % line)

        says(b"drain\n", agiproxy.AgentReport("drain"))
        held = self.hold(proxy, second)             # a live session goes on
        for _ in range(6):
            asterisk(self.port(proxy), header("x"))
        self.assertEqual(len(first.headers), 0)
        says(b"ready 50%\n", agiproxy.AgentReport("up", 0.5))
        for _ in range(6):
            asterisk(self.port(proxy), header("x"))
        self.assertEqual(len(first.headers), 2)     # a third of six
        says(b"junk!\n", agiproxy.AgentReport("up", 0.5), 'said "junk!": unknown word junk!; ignored')
        says(b"100%,maxconn:1\n", agiproxy.AgentReport("up", 1.0, 1))
        self.hold(proxy, first)
        for _ in range(4):
            asterisk(self.port(proxy), header("x"))
        self.assertEqual(len(first.headers), 3)     # held at its maxconn
        says(b"down\n", agiproxy.AgentReport("down", 1.0, 1))
        self.assertEqual(self.state(proxy, first.port).active, 1)
        held.close()

    def test_unreachable_agent_changes_nothing(self):
        upstream = self.server()
        proxy = self.proxy("""
            [agiproxy]
            listen = 127.0.0.1:0
            [pool main]
            agent_port = %d
            agent_interval = 0.05
            check_timeout = 0.2
            servers = 127.0.0.1:%d
            [route all]
            path = *
            pool = main
        """ % (dead_port(), upstream.port))
        wait_until(lambda: self.log_has("agent of 127.0.0.1:%d in pool main" % upstream.port), message="a log line")
        self.assertEqual(asterisk(self.port(proxy)).commands, [b"ANSWER", b"GET VARIABLE CHANNEL"])


REROUTES = """
    [agiproxy]
    [pool old]
    servers = 10.0.0.1
    [pool new]
    servers = 10.0.0.2
    [route legacy]
    match = ^/legacy/(\\w+)/(\\w+)$
    rewrite = /v2/{2}/{1}?{query}
    reroute = yes
    pool = old
    [route v2-billing]
    path = v2/billing
    pool = new
    [route ping]
    match = ^/ping/(\\w+)
    rewrite = /pong/{1}
    reroute = yes
    pool = old
    [route pong]
    match = ^/pong/(\\w+)
    rewrite = /ping/{1}
    reroute = yes
    pool = old
    [route all]
    path = *
    pool = old
"""


class RerouteTest(FleetCase):
    """Part 5: a rewritten request is routed again."""

    def test_hops_and_run_time_loop(self):
        config = make_config(REROUTES)
        upstreams = agiproxy.Upstreams(config)
        request = agiproxy.parse_request("agi://pbx/legacy/charge/billing?x=1")
        hops = upstreams.router.hops(request, {})
        self.assertEqual([(r.name, p, q) for r, p, q in hops],
                         [("legacy", "/v2/billing/charge", "x=1"), ("v2-billing", "/v2/billing/charge", "x=1")])
        route, pool, path, query = upstreams.route(request, agiproxy.AgiHeader.parse(header("legacy/a/b")))
        self.assertEqual((route.name, pool.name, path, query), ("v2-billing", "new", "/v2/billing/charge", "x=1"))
        with self.assertRaises(agiproxy.RerouteError) as caught:
            upstreams.router.hops(agiproxy.parse_request("agi://pbx/ping/1"), {})
        self.assertIn("ping -> pong -> ping", str(caught.exception))
        out = io.StringIO()
        self.assertEqual(agiproxy.explain(config, "agi://pbx/legacy/charge/billing", out=out), 0)
        self.assertIn("reroute:  route legacy rewrites it to /v2/billing/charge and routes it again", out.getvalue())
        self.assertIn("route:    v2-billing", out.getvalue())

    def test_visible_loop_is_a_config_error(self):
        with self.assertRaises(agiproxy.ConfigError) as caught:
            make_config("""
                [agiproxy]
                [pool p]
                servers = 10.0.0.1
                [route a]
                path = a
                rewrite = /b
                reroute = yes
                pool = p
                [route b]
                path = b
                rewrite = /a?x=1
                reroute = yes
                pool = p
            """)
        self.assertIn("[route a] reroute: the rewritten request is routed back: a -> b -> a", str(caught.exception))
        with self.assertRaises(agiproxy.ConfigError) as caught:
            make_config("[agiproxy]\n[pool p]\nservers = h\n[route a]\npath = a\nreroute = yes\npool = p\n")
        self.assertIn("needs rewrite", str(caught.exception))

    def test_sessions_follow_the_reroute_and_a_loop_is_badrequest(self):
        upstream = self.server()
        proxy = self.proxy(REROUTES.replace("[agiproxy]", "[agiproxy]\n    listen = 127.0.0.1:0")
                           .replace("10.0.0.2", "127.0.0.1:%d" % upstream.port))
        self.assertEqual(asterisk(self.port(proxy), header("legacy/charge/billing")).commands[0], b"ANSWER")
        self.assertIn(b"agi_request: agi://127.0.0.1:4573/v2/billing/charge\n", upstream.headers[0])
        self.assertEqual(asterisk(self.port(proxy), header("ping/1")).status, "BADREQUEST")
        self.assertTrue(self.log_has("reroute loop: ping -> pong -> ping"))
        self.assertIdle(proxy)


class CountingResult(unittest.TextTestResult):
    """Counts successes itself: whether testsRun includes skipped tests differs between versions."""

    passed = 0

    def addSuccess(self, test):
        unittest.TextTestResult.addSuccess(self, test)
        self.passed += 1


class CountingRunner(unittest.TextTestRunner):
    resultclass = CountingResult


def main():
    """unittest's runner, plus the plain closing line CI reads: 'N passed, N failed, N skipped'."""
    result = unittest.main(testRunner=CountingRunner, exit=False).result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    sys.stdout.write("%d passed, %d failed, %d skipped\n" % (result.passed, failed, len(result.skipped)))
    return 1 if failed or not result.passed else 0


if __name__ == "__main__":
    sys.exit(main())
