#!/usr/bin/env python3
"""agiproxy: a reverse proxy for Asterisk's FastAGI protocol.

Asterisk runs ``AGI(agi://proxy:4573/billing/charge?x=1,arg)``; agiproxy reads the
FastAGI header (``agi_*: value`` lines up to a blank line), picks a route from
the request URL and any header variable, picks a healthy server of the route's
pool, forwards the header byte for byte and relays both ways until one side
closes.  When it cannot serve a session it tells the dialplan why
(``AGIPROXY_STATUS``) and ends the AGI with ``AGISTATUS=FAILURE``.

Usage::

    agiproxy.py -c agiproxy.conf                run in the foreground
    agiproxy.py -c agiproxy.conf --check        validate the configuration
    agiproxy.py -c agiproxy.conf -t URL [--var agi_context=from-pstn ...]
                                                explain how URL would be routed
    agiproxy.py --probe agi://host:4573/path [--arg A ...] [--var NAME=VALUE ...]
                                                play Asterisk against a FastAGI server
    agiproxy.py -c FILE --daemon --pidfile /run/agiproxy.pid --user asterisk

Signals: HUP reloads the configuration and reopens the log file; TERM or INT
stop accepting and wait for live sessions (a second one exits at once); USR1
writes a status dump to the log.

The whole program is this one file and needs nothing but Python 3.6 or newer.
"""

import argparse
import collections
import errno
import hashlib
import heapq
import ipaddress
import itertools
import logging
import logging.handlers
import math
import os
import queue
import re
import selectors
import shlex
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import configparser
import http.server

__version__ = "1.0.0"

###############################################################################
# Constants ###################################################################
###############################################################################

DEFAULT_CONFIG = "/usr/local/etc/agiproxy.conf"
DEFAULT_PORT = 4573

#: Bytes read per recv() while relaying; AGI lines are short, 520 usage blocks a few KiB.
RELAY_CHUNK = 16384
#: Bytes buffered toward one side before we stop reading from the other.
RELAY_BUFFER_LIMIT = 1 << 20
#: Time allowed to flush what is in flight once one side has closed.
FLUSH_TIMEOUT = 2.0
#: Time the failure path waits for Asterisk's reply to SET VARIABLE.
FAILURE_REPLY_TIMEOUT = 2.0
#: Stack size of worker threads: they only read a header and connect, and the
#: default 8 MiB each adds up during a burst of calls.
THREAD_STACK_SIZE = 512 * 1024
#: Buckets of the session duration histogram, in seconds.
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

log = logging.getLogger("agiproxy")

###############################################################################
# Configuration ###############################################################
###############################################################################


class ConfigError(Exception):
    """A configuration that cannot be used.  The message names the place."""


def parse_duration(text):
    """Return seconds from ``2``, ``2.5``, ``500ms``, ``2s``, ``5m`` or ``1h``."""
    match = re.match(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?$", text.strip())
    if not match:
        raise ValueError("expected a duration such as 2, 2.5s, 500ms, 5m or 1h")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * scale


def parse_boolean(text):
    """Return True or False from yes/no, true/false, on/off or 1/0."""
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError("expected yes or no")


def parse_count(text):
    """Return a non-negative integer."""
    if not re.match(r"^\d+$", text.strip()):
        raise ValueError("expected a whole number (0 or more)")
    return int(text)


def parse_ratio(text):
    """Return a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number between 0 and 1, such as 0.8")
    if not 0 < value <= 1:
        raise ValueError("expected a number between 0 and 1, such as 0.8")
    return value


def parse_address(text, default_port=DEFAULT_PORT):
    """Return ``(host, port)`` from ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    text = text.strip()
    match = re.match(r"^\[([0-9A-Fa-f:.%\w]+)\](?::(\d+))?$", text)
    if match:
        host, port = match.group(1), match.group(2)
    elif text.count(":") > 1:
        host, port = text, None
    else:
        host, _, port = text.partition(":")
        port = port or None
        if not re.match(r"^[\w.-]+$", host) or (port is not None and not port.isdigit()):
            raise ValueError("expected host, host:port or [ipv6]:port, got %r" % text)
    if text.count(":") > 1 and not match:
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise ValueError("expected host, host:port or [ipv6]:port, got %r" % text)
    port = int(port) if port is not None else default_port
    if not 0 <= port <= 65535:
        raise ValueError("port %d out of range" % port)
    return host, port


def format_address(host, port):
    """Return ``host:port``, bracketing IPv6 literals."""
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def parse_address_list(text):
    """Return a list of addresses separated by commas or white space."""
    return [parse_address(item) for item in re.split(r"[\s,]+", text.strip()) if item]


def parse_networks(text):
    """Return a list of ip_network objects from addresses and CIDR networks."""
    networks = []
    for item in re.split(r"[\s,]+", text.strip()):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError("expected an address or CIDR network, got %r" % item)
    return networks


def parse_command(text):
    """Split a hook command line the way a shell would, without running a shell."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError("cannot split command line: %s" % exc)
    unknown = set(re.findall(r"\{(\w*)\}", text)) - {"pool", "active", "capacity"}
    if unknown:
        raise ValueError("unknown placeholder {%s}; use {pool}, {active} or {capacity}" % sorted(unknown)[0])
    return words


def parse_readable_file(text):
    """Return a path that names a readable file, or '' when empty."""
    path = text.strip()
    if path and not os.access(path, os.R_OK):
        raise ValueError("cannot read file %r" % path)
    return path


def parse_variable_name(text):
    """Return a dialplan/header variable name."""
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", text.strip()):
        raise ValueError("expected a variable name such as AGIPROXY_STATUS")
    return text.strip()


def parse_regex(text):
    """Compile a regular expression."""
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError("invalid regular expression: %s" % exc)


def choice(*choices):
    """Return a parser that accepts one of *choices*."""

    def parse(text):
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of %s" % ", ".join(choices))
        return value

    return parse


def text_value(text):
    return text.strip()


#: Keys of [agiproxy]: name -> (parser, default).  agiproxy.conf.sample documents each.
GLOBAL_OPTIONS = collections.OrderedDict([
    ("listen", (parse_address_list, "127.0.0.1:4573")),
    ("backlog", (parse_count, "1024")),
    ("allow", (parse_networks, "")),
    ("deny", (parse_networks, "")),
    ("tls_listen", (parse_address_list, "")),
    ("tls_cert", (parse_readable_file, "")),
    ("tls_key", (parse_readable_file, "")),
    ("tls_client_ca", (parse_readable_file, "")),
    ("tls_allow", (parse_networks, "")),
    ("tls_deny", (parse_networks, "")),
    ("header_timeout", (parse_duration, "5")),
    ("max_header_bytes", (parse_count, "65536")),
    ("max_header_lines", (parse_count, "256")),
    ("connect_timeout", (parse_duration, "2")),
    ("connect_budget", (parse_duration, "4")),
    ("idle_timeout", (parse_duration, "0")),
    ("max_session_time", (parse_duration, "0")),
    ("max_sessions", (parse_count, "0")),
    ("failure_variable", (parse_variable_name, "AGIPROXY_STATUS")),
    ("forwarded_for", (parse_boolean, "no")),
    ("log", (text_value, "stderr")),
    ("log_level", (choice("debug", "info", "warning", "error"), "info")),
    ("access_log", (parse_boolean, "yes")),
    ("stats_listen", (parse_address_list, "")),
    ("drain_timeout", (parse_duration, "0")),
    ("spare_threads", (parse_count, "64")),
])

#: Keys of [pool NAME].
POOL_OPTIONS = collections.OrderedDict([
    ("servers", (text_value, "")),
    ("mode", (choice("failover", "round-robin", "least-sessions", "hash"), "failover")),
    ("hash", (parse_variable_name, "agi_uniqueid")),
    ("rewrite_host", (parse_boolean, "no")),
    ("tls_verify", (parse_boolean, "yes")),
    ("tls_ca", (parse_readable_file, "")),
    ("tls_client_cert", (parse_readable_file, "")),
    ("tls_client_key", (parse_readable_file, "")),
    ("retry_after", (parse_duration, "1")),
    ("retry_after_max", (parse_duration, "30")),
    ("early_close_limit", (parse_count, "3")),
    ("check", (choice("none", "tcp", "agi"), "none")),
    ("check_path", (text_value, "agiproxy-check")),
    ("check_interval", (parse_duration, "5")),
    ("check_timeout", (parse_duration, "2")),
    ("rise", (parse_count, "2")),
    ("fall", (parse_count, "3")),
    ("saturation", (parse_ratio, "0.8")),
    ("saturation_interval", (parse_duration, "60")),
    ("on_saturation", (parse_command, "")),
    ("on_recovery", (parse_command, "")),
    ("hook_timeout", (parse_duration, "30")),
])

#: Keys of [route NAME]; any key starting with ``agi_`` is a condition on that header variable.
ROUTE_OPTIONS = collections.OrderedDict([
    ("pool", (text_value, "")),
    ("path", (text_value, "")),
    ("match", (parse_regex, "")),
    ("host", (text_value, "")),
    ("rewrite", (text_value, "")),
    ("rewrite_host", (choice("yes", "no", "true", "false", "on", "off", "1", "0", "pool"), "pool")),
])


class Settings(object):
    """Attribute access to the parsed options of one section."""

    def __init__(self, values):
        self.__dict__.update(values)


class Config(object):
    """A parsed, validated configuration: global settings, pools and routes.

    Build one with load_config() or parse_config(); both raise ConfigError.
    """

    def __init__(self, source, settings, pools, routes):
        self.source = source
        self.settings = settings
        self.pools = pools      # name -> PoolSpec
        self.routes = routes    # list of Route, in file order


class PoolSpec(object):
    """A [pool] section: its settings and server lines, before any runtime state."""

    def __init__(self, name, settings, servers):
        self.name = name
        self.settings = settings
        self.servers = servers  # list of ServerSpec


ServerSpec = collections.namedtuple("ServerSpec", "host port weight max backup tls tls_verify")


def parse_server_line(line, pool_settings):
    """Return a ServerSpec from ``host[:port] [weight=N] [max=N] [backup] [tls] [tls_verify=no]``."""
    words = line.split()
    host, port = parse_address(words[0])
    weight, maximum, backup, tls, verify = 1, 0, False, False, pool_settings.tls_verify
    for word in words[1:]:
        name, _, value = word.partition("=")
        if name == "weight" and value:
            weight = parse_count(value)
            if weight < 1:
                raise ValueError("weight must be 1 or more")
        elif name == "max" and value:
            maximum = parse_count(value)
        elif name == "tls_verify" and value:
            verify = parse_boolean(value)
        elif word == "backup":
            backup = True
        elif word == "tls":
            tls = True
        else:
            raise ValueError("unknown server option %r (expected weight=N, max=N, backup, tls, tls_verify=no)" % word)
    if port == 0:
        raise ValueError("server port must not be 0")
    return ServerSpec(host, port, weight, maximum, backup, tls, verify)


class _ConfigReader(object):
    """Parse sections with a table of options and report errors by file and line."""

    def __init__(self, text, source):
        self.source = source
        self.lines = text.splitlines()
        self.parser = configparser.ConfigParser(
            interpolation=None, inline_comment_prefixes=(";",), default_section="\x00none",
            empty_lines_in_values=False, strict=True)
        try:
            self.parser.read_string(text, source)
        except configparser.Error as exc:
            raise ConfigError("%s: %s" % (source, " ".join(str(exc).split())))

    def where(self, section, key=None):
        """Return ``file:line: [section] key`` for an error message."""
        line_number, in_section = 0, False
        for number, line in enumerate(self.lines, 1):
            stripped = line.strip()
            if stripped.startswith("["):
                in_section = stripped == "[%s]" % section
                if in_section and not line_number:
                    line_number = number
            elif in_section and key and re.match(r"^%s\s*[=:]" % re.escape(key), stripped, re.I):
                line_number = number
                break
        place = "%s:%d: [%s]" % (self.source, line_number, section)
        return "%s %s" % (place, key) if key else place

    def error(self, section, key, message):
        return ConfigError("%s: %s" % (self.where(section, key), message))

    def read(self, section, options, extra=None):
        """Return Settings for *section*; *extra(key, value)* may accept keys outside *options*."""
        items = self.parser[section] if section in self.parser else {}
        for key in items:
            if key not in options and not (extra and extra(key, items[key])):
                raise self.error(section, key, "unknown key (expected one of %s)" % ", ".join(options))
        values = {}
        for key, (parse, default) in options.items():
            raw = items.get(key, default)
            if not raw.strip():
                if parse not in EMPTY_VALUES:
                    raise self.error(section, key, "needs a value (default: %s)" % (default or "none"))
                values[key] = EMPTY_VALUES[parse]
                continue
            try:
                values[key] = parse(raw)
            except ValueError as exc:
                raise self.error(section, key, "%s (got %r)" % (exc, raw))
        return Settings(values)


#: The options that may be left empty, and what empty means for them.
EMPTY_VALUES = {text_value: "", parse_readable_file: "", parse_regex: None,
                parse_address_list: [], parse_networks: [], parse_command: []}


def parse_config(text, source="<config>"):
    """Parse and validate configuration *text*; return a Config or raise ConfigError."""
    reader = _ConfigReader(text, source)
    sections = reader.parser.sections()
    if "agiproxy" not in sections:
        raise ConfigError("%s: missing section [agiproxy]" % source)
    settings = reader.read("agiproxy", GLOBAL_OPTIONS)
    _validate_global(reader, settings)
    pools = collections.OrderedDict()
    routes = []
    for section in sections:
        kind, _, name = section.partition(" ")
        name = name.strip()
        if section == "agiproxy":
            continue
        if kind == "pool" and name:
            pools[name] = _read_pool(reader, section, name)
        elif kind == "route" and name:
            routes.append(_read_route(reader, section, name, len(routes)))
        else:
            raise ConfigError("%s: unknown section (expected [agiproxy], [pool NAME] or [route NAME])"
                              % reader.where(section))
    for route in routes:
        if route.pool not in pools:
            raise reader.error("route %s" % route.name, "pool", "no section [pool %s]" % route.pool)
    if not routes:
        log.debug("%s: no [route] sections: every session will get NOROUTE", source)
    return Config(source, settings, pools, routes)


def load_config(path):
    """Read and parse the configuration file at *path*."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError("%s: cannot read configuration: %s" % (path, exc.strerror or exc))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: not UTF-8 text (byte %d)" % (path, exc.start))
    return parse_config(text, path)


def _validate_global(reader, settings):
    if not settings.listen and not settings.tls_listen:
        raise reader.error("agiproxy", "listen", "at least one of listen and tls_listen is needed")
    if settings.tls_listen and not (settings.tls_cert and settings.tls_key):
        raise reader.error("agiproxy", "tls_listen", "needs tls_cert and tls_key")
    if settings.tls_cert:
        try:
            make_server_context(settings)
        except (ssl.SSLError, OSError) as exc:
            raise reader.error("agiproxy", "tls_cert", "cannot load certificate/key: %s" % exc)
    if settings.backlog < 1:
        raise reader.error("agiproxy", "backlog", "must be 1 or more")
    if settings.header_timeout <= 0:
        raise reader.error("agiproxy", "header_timeout", "must be more than 0")
    if settings.connect_timeout <= 0:
        raise reader.error("agiproxy", "connect_timeout", "must be more than 0")
    if settings.connect_budget < settings.connect_timeout:
        raise reader.error("agiproxy", "connect_budget", "must be at least connect_timeout")
    if settings.max_header_lines < 4:
        raise reader.error("agiproxy", "max_header_lines", "too small for an Asterisk header (at least 4)")
    if settings.max_header_bytes < 256:
        raise reader.error("agiproxy", "max_header_bytes", "too small for an Asterisk header (at least 256)")
    if len(settings.stats_listen) > 1:
        raise reader.error("agiproxy", "stats_listen", "one address only")
    if settings.log not in ("stderr", "syslog") and not settings.log.startswith("/"):
        raise reader.error("agiproxy", "log", "expected stderr, syslog or an absolute file path")


def _read_pool(reader, section, name):
    settings = reader.read(section, POOL_OPTIONS)
    servers = []
    for line in settings.servers.splitlines():
        line = line.split(";")[0].strip()
        if line:
            try:
                servers.append(parse_server_line(line, settings))
            except ValueError as exc:
                raise reader.error(section, "servers", str(exc))
    if not servers:
        raise reader.error(section, "servers", "a pool needs at least one server")
    if len(set((s.host, s.port, s.tls) for s in servers)) != len(servers):
        raise reader.error(section, "servers", "a server is listed twice")
    if (settings.on_saturation or settings.on_recovery) and any(not s.max for s in servers):
        raise reader.error(section, "on_saturation", "needs max=N on every server to know the capacity")
    if settings.tls_client_cert and not settings.tls_client_key:
        raise reader.error(section, "tls_client_key", "needed with tls_client_cert")
    if settings.check != "none" and (settings.rise < 1 or settings.fall < 1):
        raise reader.error(section, "rise", "rise and fall must be 1 or more")
    for key in ("check_interval", "check_timeout"):
        if getattr(settings, key) <= 0:
            raise reader.error(section, key, "must be more than 0")
    if settings.retry_after_max < settings.retry_after:
        raise reader.error(section, "retry_after_max", "must be at least retry_after")
    if any(s.tls for s in servers):
        try:
            make_client_context(settings, True)
        except (ssl.SSLError, OSError) as exc:
            raise reader.error(section, "tls_ca", "cannot load TLS files: %s" % exc)
    return PoolSpec(name, settings, servers)


def _read_route(reader, section, name, index):
    conditions = []

    def condition(key, value):
        if not key.startswith("agi_"):
            return False
        try:
            conditions.append((key, parse_regex(value)))
        except ValueError as exc:
            raise reader.error(section, key, str(exc))
        return True

    settings = reader.read(section, ROUTE_OPTIONS, condition)
    if not settings.pool:
        raise reader.error(section, "pool", "every route needs pool = NAME")
    if not (settings.path or settings.match or settings.host or conditions):
        raise reader.error(section, "path", "a route needs at least one of path, match, host or agi_* "
                                            "(use path = * for a catch-all)")
    rewrite_host = None if settings.rewrite_host == "pool" else parse_boolean(settings.rewrite_host)
    route = Route(name, settings.pool, path=settings.path or None, pattern=settings.match,
                  host=settings.host or None, conditions=conditions,
                  rewrite=settings.rewrite or None, rewrite_host=rewrite_host, index=index)
    try:
        route.check_template()
    except ValueError as exc:
        raise reader.error(section, "rewrite", str(exc))
    return route


###############################################################################
# The AGI header and the router (pure: no I/O) ################################
###############################################################################


class HeaderError(Exception):
    """A client's header that cannot be an Asterisk FastAGI header."""


#: A whole header body (decoded), so one C-level match validates every line.  Each
#: line must match one way only: an optional space before a free value would let a
#: bad last line cost 2**lines steps (with the GIL held).
_HEADER_BODY = re.compile(r"(?:[A-Za-z0-9_]+:[^\n\x00]*\n)*")
_HEADER_VARIABLE = re.compile(r"^([A-Za-z0-9_]+): ?([^\n]*?)\r?$", re.M)
_HEADER_LINE = re.compile(r"[A-Za-z0-9_]+:[^\n\x00]*\n?")
_LINE = re.compile(rb"[^\n]*\n")
_BLANK_LINE = re.compile(rb"\n\r?\n")


def header_end(buffer):
    """Return the offset just past the blank line that ends the header in *buffer*, or -1.

    A header consisting of nothing but a blank line ends at once (it is then rejected
    for lacking agi_request)."""
    if buffer[:1] == b"\n":
        return 1
    if buffer[:2] == b"\r\n":
        return 2
    match = _BLANK_LINE.search(buffer)
    return match.end() if match else -1


class AgiHeader(object):
    """The FastAGI header a client sent, kept as raw lines so it can be forwarded unchanged.

    ``lines`` are the raw lines (with their line endings) without the blank line;
    ``terminator`` is the blank line as sent; ``variables`` maps names to values
    decoded as UTF-8 with surrogate escapes, so any byte round-trips.
    """

    def __init__(self, body, terminator=b"\n"):
        self.lines = _LINE.findall(body)
        self.terminator = terminator
        text = decode(body)
        if not _HEADER_BODY.fullmatch(text):
            for number, line in enumerate(text.splitlines(True), 1):
                if not _HEADER_LINE.fullmatch(line):
                    raise HeaderError("malformed header line %d: %s" % (number, printable(line[:80])))
        self.variables = dict(reversed(_HEADER_VARIABLE.findall(text)))    # the first of a name wins

    @classmethod
    def parse(cls, data):
        """Build a header from the bytes up to and including the blank line."""
        if data.endswith(b"\r\n"):
            return cls(data[:-2], data[-2:])
        return cls(data[:-1], data[-1:])

    def __len__(self):
        return len(self.lines)

    def get(self, name, default=None):
        return self.variables.get(name, default)

    def encode(self, replace=None, drop=(), append=()):
        """Return the header as bytes, in the client's order and line endings.

        *replace* maps a variable name to a new value for its line (inserting
        ``agi_network_script`` before ``agi_request`` when it was absent);
        lines named in *drop* are left out; *append* holds ``(name, value)``
        pairs written last, before the blank line."""
        if not replace and not drop and not append:
            return b"".join(self.lines) + self.terminator
        replace = dict(replace or {})
        eol = self.lines[0][-2:] if self.lines and self.lines[0].endswith(b"\r\n") else b"\n"
        out = []
        for line in self.lines:
            name = line.split(b":", 1)[0].decode("ascii")
            if name in drop:
                continue
            if name == "agi_request" and "agi_network_script" in replace \
                    and "agi_network_script" not in self.variables and replace["agi_network_script"]:
                out.append(b"agi_network_script: " + encode(replace.pop("agi_network_script")) + eol)
            if name in replace:
                value = replace.pop(name)
                if name == "agi_network_script" and not value:
                    continue
                ending = b"\r\n" if line.endswith(b"\r\n") else b"\n"
                out.append(name.encode("ascii") + b": " + encode(value) + ending)
            else:
                out.append(line)
        for name, value in append:
            out.append(name.encode("ascii") + b": " + encode(value) + eol)
        return b"".join(out) + self.terminator


def decode(data):
    """Bytes from the wire to str; undecodable bytes survive as surrogates."""
    return data.decode("utf-8", "surrogateescape")


def encode(text):
    """The inverse of decode()."""
    return text.encode("utf-8", "surrogateescape")


def printable(data):
    """A log-safe rendering of untrusted bytes or text."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "backslashreplace")
    return data.encode("unicode_escape").decode("ascii").replace('"', '\\"')


class AgiRequest(collections.namedtuple("AgiRequest", "scheme host port path query")):
    """The parts of an ``agi_request`` URL.  ``port`` is None when the URL has none."""

    __slots__ = ()

    @property
    def authority(self):
        if self.port is None:
            return "[%s]" % self.host if ":" in self.host else self.host
        return format_address(self.host, self.port)

    @property
    def script(self):
        """The URL after ``host:port/``, as Asterisk writes it in agi_network_script."""
        script = self.path[1:] if self.path.startswith("/") else self.path
        return script + "?" + self.query if self.query else script

    def url(self, authority=None):
        tail = self.path + ("?" + self.query if self.query else "")
        return "%s://%s%s" % (self.scheme, self.authority if authority is None else authority, tail)


_REQUEST_URL = re.compile(r"^(agi|hagi)://(\[[^\]/?]*\]|[^/?:\[\]]*)(?::(\d{1,5}))?(/[^?]*)?(?:\?(.*))?$",
                          re.I | re.S)


def parse_request(url):
    """Parse an ``agi://`` or ``hagi://`` URL; raise ValueError for anything else."""
    match = _REQUEST_URL.match(url)
    if not match:
        raise ValueError("not an agi:// or hagi:// URL: %s" % printable(url[:200]))
    scheme, host, port, path, query = match.groups()
    if port and int(port) > 65535:
        raise ValueError("port %s out of range: %s" % (port, printable(url[:200])))
    return AgiRequest(scheme, host.strip("[]"), int(port) if port else None, path or "", query or "")


def normalize_path(path):
    """``billing``, ``/billing`` and ``/billing/`` all become ``/billing``."""
    return "/" + path.strip("/")


_PLACEHOLDER = re.compile(r"\{(\w+)\}|\{\{|\}\}")


class Route(object):
    """A [route] section: conditions that must all match, a pool and an optional rewrite.

    ``path`` matches the request path and everything below it on ``/``
    boundaries (agitator semantics); ``*`` is the catch-all.  ``pattern`` is a
    regex searched in the path; its groups feed ``rewrite``.  ``host`` must
    equal the URL's host; ``conditions`` are ``(variable, regex)`` pairs
    searched in header values.
    """

    def __init__(self, name, pool, path=None, pattern=None, host=None, conditions=(),
                 rewrite=None, rewrite_host=None, index=0):
        self.name = name
        self.pool = pool
        self.path = path if path in (None, "*") else normalize_path(path)
        self.pattern = pattern
        self.host = host
        self.conditions = list(conditions)
        self.rewrite = rewrite
        self.rewrite_host = rewrite_host
        self.index = index

    @property
    def conditional(self):
        """True for routes tried in file order before plain path routes."""
        return bool(self.pattern or self.host or self.conditions)

    def match(self, request, variables):
        """Return the regex groups (possibly empty) when every condition matches, else None."""
        if self.path not in (None, "*"):
            path = normalize_path(request.path)
            if path != self.path and not path.startswith(self.path + "/") and self.path != "/":
                return None
        if self.host is not None and request.host.lower() != self.host.lower():
            return None
        for name, regex in self.conditions:
            if name not in variables or not regex.search(variables[name]):
                return None
        groups = {}
        if self.pattern is not None:
            found = self.pattern.search(request.path)
            if not found:
                return None
            groups["0"] = found.group(0)
            for number, value in enumerate(found.groups(), 1):
                groups[str(number)] = value or ""
            for name, value in found.groupdict().items():
                groups[name] = value or ""
        return groups

    def check_template(self):
        """Raise ValueError when ``rewrite`` names a placeholder that can never be filled."""
        if not self.rewrite:
            return
        known = {"path", "query", "host"}
        if self.pattern is not None:
            known.update(str(n) for n in range(self.pattern.groups + 1))
            known.update(self.pattern.groupindex)
        for match in _PLACEHOLDER.finditer(self.rewrite):
            name = match.group(1)
            if name is not None and name not in known and not name.startswith("agi_"):
                raise ValueError("unknown placeholder {%s}: use regex groups of match, {path}, {query}, "
                                 "{host} or a header variable such as {agi_callerid}" % name)

    def rewritten(self, request, variables, groups):
        """Return (path, query) for the upstream: the rewrite template filled in, or the original."""
        if not self.rewrite:
            return request.path, request.query
        values = dict(variables, path=request.path, query=request.query, host=request.host)
        values.update(groups)

        def fill(match):
            if match.group(1) is None:
                return match.group(0)[0]
            return values.get(match.group(1), "")

        path, _, query = _PLACEHOLDER.sub(fill, self.rewrite).partition("?")
        return "/" + path.lstrip("/"), query


class Router(object):
    """Choose the route for a request.

    Precedence, fixed and documented in the README:

    1. routes with ``match``, ``host`` or an ``agi_*`` condition, in file order:
       the first whose conditions all hold wins;
    2. routes with only ``path``: the longest matching path wins (agitator);
    3. the ``path = *`` catch-all.
    """

    def __init__(self, routes):
        self.routes = list(routes)
        self.conditional = [r for r in self.routes if r.conditional]
        self.by_path = sorted((r for r in self.routes if not r.conditional and r.path != "*"),
                              key=lambda r: (-len(r.path), r.index))
        self.catch_all = [r for r in self.routes if not r.conditional and r.path == "*"]

    def route(self, request, variables):
        """Return ``(route, groups)`` for the winning route, or ``(None, None)``."""
        for route in self.conditional + self.by_path + self.catch_all:
            groups = route.match(request, variables)
            if groups is not None:
                return route, groups
        return None, None


###############################################################################
# Upstream pools and health ###################################################
###############################################################################


class ServerState(object):
    """Health and live sessions of one upstream address.

    One object per ``(host, port, tls)``, shared by every pool that lists the
    address and carried over by a reload, so counts and health survive it.
    Every attribute is guarded by the proxy's lock.

    Passive health: a failed connect (or ``early_close_limit`` sessions in a
    row that the server closed before saying anything) marks the server down
    for ``retry_after`` seconds.  Then one session may try it (half-open):
    the server is up again once it sends that session its first byte; a
    failed trial doubles the wait, up to ``retry_after_max``.  Failures of
    sessions that were sent there before it went down change nothing: one
    outage is one step.  Active checks, when a pool has them, decide with
    ``rise``/``fall`` instead.
    """

    def __init__(self, host, port, tls):
        self.host, self.port, self.tls = host, port, tls
        self.name = format_address(host, port) + ("/tls" if tls else "")
        self.active = 0
        self.up = True
        self.why_down = ""
        self.retry_at = 0.0
        self.backoff = 0.0
        self.trial = False
        self.early_closes = 0
        self.check_streak = 0       # > 0: checks passed in a row, < 0: failed in a row
        self.sessions = 0
        self.connect_failures = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def available(self, now, trials):
        """Can a session be sent here?  *trials*: may a down server get a half-open try?"""
        return self.up or (trials and not self.trial and now >= self.retry_at)

    def mark_down(self, now, why, retry_after, retry_after_max, trial=False):
        """Record a failure; *trial*: of the half-open try.  Return True when this turned the server down."""
        was_up = self.up
        if was_up:
            self.backoff = retry_after
        elif trial:
            self.backoff = min(max(self.backoff * 2, retry_after), retry_after_max)
        else:
            return False    # a session sent here before the server went down: same outage
        self.up, self.trial, self.why_down = False, False, why
        self.retry_at = now + self.backoff
        self.early_closes = 0
        return was_up

    def mark_up(self):
        """Record a success; return True when this brought the server back."""
        was_down = not self.up
        self.up, self.trial, self.why_down, self.backoff = True, False, "", 0.0
        return was_down


class Member(object):
    """One server line of one pool: the shared state plus this pool's weight, max and flags."""

    def __init__(self, spec, state, tls_context):
        self.state = state
        self.weight = spec.weight
        self.max = spec.max
        self.backup = spec.backup
        self.tls_context = tls_context   # None for plain TCP
        self.current_weight = 0          # smooth weighted round-robin

    @property
    def name(self):
        return self.state.name

    def full(self):
        return bool(self.max) and self.state.active >= self.max


class PoolState(object):
    """What a pool keeps across reloads, shared by its old and new Pool objects
    (guarded by the proxy's lock): ended sessions, saturation, its hook runner."""

    def __init__(self):
        self.sessions = 0
        self.saturated = False
        self.saturation_hook_at = -math.inf
        self.hooks = HookRunner()


class Pool(object):
    """The servers of a [pool] section and the policy for choosing among them.

    order() and reserve() are called with the proxy's lock held; they do no I/O.
    """

    def __init__(self, spec, states):
        self.name = spec.name
        self.settings = spec.settings
        self.mode = spec.settings.mode
        contexts = {}
        self.members = []
        for server in spec.servers:
            context = None
            if server.tls:
                if server.tls_verify not in contexts:
                    contexts[server.tls_verify] = make_client_context(spec.settings, server.tls_verify)
                context = contexts[server.tls_verify]
            key = (server.host, server.port, server.tls)
            state = states.setdefault(key, ServerState(server.host, server.port, server.tls))
            self.members.append(Member(server, state, context))
        self.primaries = [m for m in self.members if not m.backup]
        self.backups = [m for m in self.members if m.backup]
        self.capacity = sum(m.max for m in self.members) if all(m.max for m in self.members) else 0
        self.rotation = 0
        self.state = PoolState()

    @property
    def active(self):
        return sum(m.state.active for m in self.members)

    @property
    def trials(self):
        """Half-open tries are for pools without active checks; checks decide otherwise."""
        return self.settings.check == "none"

    def order(self, variables, client_host=""):
        """Return every member in the order this session should try them."""
        return self._arrange(self.primaries, variables, client_host) + \
            self._arrange(self.backups, variables, client_host)

    def _arrange(self, members, variables, client_host):
        if len(members) < 2 or self.mode == "failover":
            return list(members)
        self.rotation += 1
        if self.mode == "round-robin":
            total = sum(m.weight for m in members)
            for member in members:
                member.current_weight += member.weight
            chosen = max(members, key=lambda m: m.current_weight)
            chosen.current_weight -= total
            start = members.index(chosen)
            return members[start:] + members[:start]
        if self.mode == "least-sessions":
            count = len(members)
            return sorted(members, key=lambda m: (m.state.active / m.weight,
                                                  (members.index(m) - self.rotation) % count))
        key = variables.get(self.settings.hash) or client_host
        return sorted(members, key=lambda m: rendezvous_score(key, m.name, m.weight), reverse=True)

    def reserve(self, order, tried, now):
        """Take a session slot on the first member of *order* that can have one.

        Returns ``(member, trial)`` where *trial* is True for a half-open try
        of a down server, or ``(None, reason)`` with reason BUSY when a usable
        server was only skipped for being at max, else NOUPSTREAM.
        """
        busy = False
        for member in order:
            state = member.state
            if member in tried or not state.available(now, self.trials):
                continue
            if member.full():
                busy = True
                continue
            trial = not state.up
            state.trial = state.trial or trial
            state.active += 1
            return member, trial
        return None, "BUSY" if busy else "NOUPSTREAM"

    def saturation_change(self, now):
        """Return ``(hook, argv)`` when the pool crossed its saturation mark, else None."""
        if not self.capacity:
            return None
        active = self.active
        ratio = active / float(self.capacity)
        settings, state = self.settings, self.state
        if not state.saturated and ratio >= settings.saturation:
            if now - state.saturation_hook_at < settings.saturation_interval:
                return None
            state.saturated, state.saturation_hook_at = True, now
            hook = ("on_saturation", settings.on_saturation)
        elif state.saturated and ratio < settings.saturation:
            state.saturated = False
            hook = ("on_recovery", settings.on_recovery)
        else:
            return None
        if not hook[1]:
            return None
        values = {"pool": self.name, "active": str(active), "capacity": str(self.capacity)}
        return hook[0], [re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], word) for word in hook[1]]


def rendezvous_score(key, server, weight):
    """Weighted rendezvous (highest random weight) hashing score of *server* for *key*."""
    digest = hashlib.sha256(("%s\x00%s" % (key, server)).encode("utf-8", "surrogateescape")).digest()
    unit = (int.from_bytes(digest[:8], "big") + 1) / float(2 ** 64 + 1)
    return -weight / math.log(unit)


class Upstreams(object):
    """Routes and pools of one configuration, with server state carried over from the last one."""

    def __init__(self, config, previous=None):
        self.config = config
        self.states = {}
        old_states = previous.states if previous else {}
        old_pools = previous.pools if previous else {}
        self.pools = collections.OrderedDict()
        for name, spec in config.pools.items():
            shared = {}
            for server in spec.servers:
                key = (server.host, server.port, server.tls)
                shared[key] = self.states.get(key) or old_states.get(key) or ServerState(*key)
            pool = Pool(spec, shared)
            self.states.update(shared)
            if name in old_pools:
                pool.state = old_pools[name].state
            self.pools[name] = pool
        self.router = Router(config.routes)

    def decide(self, request, header, client_host=""):
        """Return ``(route, pool, order, upstream_path, upstream_query)``; route is None for no route."""
        route, groups = self.router.route(request, header.variables)
        if route is None:
            return None, None, [], request.path, request.query
        pool = self.pools[route.pool]
        path, query = route.rewritten(request, header.variables, groups)
        return route, pool, pool.order(header.variables, client_host), path, query


def forwarded_header(header, request, route, pool, server, path, query, forwarded_for=None):
    """The header to send *server*: the client's bytes unchanged, unless the route
    rewrites the path/query (agi_request and agi_network_script change), rewrite_host
    applies (agi_request names the server) or *forwarded_for* (the client's
    ``ip:port``) is to be added to agi_x_fwd_for."""
    replace, drop, append = {}, (), ()
    rewrite_host = route.rewrite_host if route.rewrite_host is not None else pool.settings.rewrite_host
    rewritten = (path, query) != (request.path, request.query)
    if rewritten or rewrite_host:
        upstream = request._replace(path=path, query=query)
        replace["agi_request"] = upstream.url(format_address(server.host, server.port) if rewrite_host else None)
        if rewritten:
            replace["agi_network_script"] = upstream.script
    if forwarded_for:
        chain = header.get("agi_x_fwd_for")
        drop = ("agi_x_fwd_for",)
        append = [("agi_x_fwd_for", chain + ", " + forwarded_for if chain else forwarded_for)]
    return header.encode(replace, drop, append)


###############################################################################
# Sockets and TLS #############################################################
###############################################################################

#: poll() where the platform has it: select() fails on descriptors past 1024.
Selector = getattr(selectors, "PollSelector", selectors.SelectSelector)
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
#: errno values that mean this process, not the peer, ran short.
LOCAL_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: What a non-blocking read or write raises when it would have to wait.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


#: OpenSSL 3 reports a TLS peer that closes without close_notify as an error;
#: FastAGI peers commonly do, and for a line protocol a close is a close.
#: (ssl.OP_IGNORE_UNEXPECTED_EOF from Python 3.10; the same bit before it.)
IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF",
                                0x80 if ssl.OPENSSL_VERSION_INFO >= (3,) else 0)


def _require_tls12(context):
    if hasattr(context, "minimum_version"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin (guarded: 3.7+)
    else:  # Python 3.6
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    context.options |= IGNORE_UNEXPECTED_EOF


def make_server_context(settings):
    """The TLS context of tls_listen: our certificate, and client certificates when tls_client_ca is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _require_tls12(context)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.tls_client_ca)
    return context


def make_client_context(settings, verify):
    """The TLS context toward a pool's servers; *verify* checks certificate and host name."""
    context = ssl.create_default_context(cafile=settings.tls_ca or None)
    _require_tls12(context)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.tls_client_cert:
        context.load_cert_chain(settings.tls_client_cert, settings.tls_client_key)
    return context


def wait_for(sock, events, timeout):
    """Wait until *sock* is ready for *events*; raise socket.timeout after *timeout* seconds."""
    with Selector() as selector:
        selector.register(sock, events)
        if not selector.select(max(timeout, 0)):
            raise socket.timeout("timed out")


def tls_handshake(sock, deadline):
    """Finish the TLS handshake of a non-blocking SSLSocket by *deadline* (a monotonic time)."""
    sock.setblocking(False)
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = READ
        except ssl.SSLWantWriteError:
            events = WRITE
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("TLS handshake timed out")
        wait_for(sock, events, remaining)


def literal_family(host):
    """AF_INET or AF_INET6 when *host* is an IP address literal, else None (a name)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except (OSError, ValueError):
            pass
    return None


def open_connection(host, port, timeout, tls_context=None):
    """Connect to an upstream within *timeout* seconds (TLS included); return the socket.

    An IP literal is connected to directly: getaddrinfo() and the IDNA codec
    cost more than the rest of the connect on loopback."""
    deadline = time.monotonic() + timeout
    family = literal_family(host)
    if family is None:
        sock = socket.create_connection((host, port), timeout)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
            tls_handshake(sock, deadline)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def read_line(sock, deadline, buffer=b"", limit=4096):
    """Read up to and including a newline by *deadline*; return ``(line, rest)``; line is b'' at EOF."""
    while b"\n" not in buffer:
        if len(buffer) > limit:
            raise ValueError("line longer than %d bytes" % limit)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            return b"", buffer
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return line + b"\n", rest


def close_quietly(sock):
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def synthetic_header(url, args=(), variables=None):
    """A complete header as Asterisk would send it for ``AGI(url,args...)``, as bytes."""
    request = parse_request(url)
    values = collections.OrderedDict([("agi_network", "yes")])
    if request.script:
        values["agi_network_script"] = request.script
    values.update([
        ("agi_request", url), ("agi_channel", "agiproxy/probe-00000001"), ("agi_language", "en"),
        ("agi_type", "agiproxy"), ("agi_uniqueid", "%.6f" % time.time()), ("agi_version", "agiproxy-" + __version__),
        ("agi_callerid", "unknown"), ("agi_calleridname", "unknown"), ("agi_callingpres", "0"),
        ("agi_callingani2", "0"), ("agi_callington", "0"), ("agi_callingtns", "0"), ("agi_dnid", "unknown"),
        ("agi_rdnis", "unknown"), ("agi_context", "default"), ("agi_extension", "s"), ("agi_priority", "1"),
        ("agi_enhanced", "0.0"), ("agi_accountcode", ""), ("agi_threadid", str(threading.get_ident()))])
    values.update(variables or {})
    for number, arg in enumerate(args, 1):
        values["agi_arg_%d" % number] = arg
    return b"".join(encode("%s: %s\n" % item) for item in values.items()) + b"\n"


###############################################################################
# Health checks and hooks #####################################################
###############################################################################


def check_server(member, settings):
    """Run one active check of *member*; return None when healthy, else why not."""
    deadline = time.monotonic() + settings.check_timeout
    sock = None
    try:
        state = member.state
        sock = open_connection(state.host, state.port, settings.check_timeout, member.tls_context)
        if settings.check == "agi":
            url = "agi://%s/%s" % (format_address(state.host, state.port), settings.check_path.lstrip("/"))
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(synthetic_header(url))
            line, _ = read_line(sock, deadline)
            if not line:
                return "closed without sending a command"
            sock.sendall(b"HANGUP\n")     # as Asterisk would: the server sees a hangup, not a broken pipe
        return None
    except (OSError, ValueError) as exc:
        return describe_error(exc)
    finally:
        close_quietly(sock)


def describe_error(exc):
    """A short text for a socket, TLS or parse error."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return "TLS: %s" % (exc.reason or exc)
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


class HealthChecker(threading.Thread):
    """Check every server of one pool each ``check_interval`` until stop()."""

    def __init__(self, proxy, pool):
        threading.Thread.__init__(self, name="check-%s" % pool.name, daemon=True)
        self.proxy, self.pool = proxy, pool
        self.stopping = threading.Event()

    def run(self):
        settings = self.pool.settings
        while not self.stopping.is_set():
            for member in self.pool.members:
                if self.stopping.is_set():
                    return
                self.proxy.check_result(self.pool, member, check_server(member, settings))
            self.stopping.wait(settings.check_interval)

    def stop(self):
        self.stopping.set()


def run_hook(name, argv, timeout):
    """Run one hook command and wait for it; log failures; kill it after *timeout* seconds."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, close_fds=True)
    except OSError as exc:
        log.error("%s hook %s could not start: %s", name, argv[0], describe_error(exc))
        return
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        log.error("%s hook %s still running after %gs: killed", name, argv[0], timeout)
        return
    if code:
        log.warning("%s hook %s exited with status %d", name, " ".join(argv), code)
    else:
        log.info("%s hook %s done", name, " ".join(argv))


class HookRunner(object):
    """Run one pool's hooks off the session threads, one at a time and in the order
    they came due, so a scaler never sees on_recovery overtake on_saturation."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending = collections.deque()
        self.running = False

    def submit(self, hook, timeout):
        """Queue ``(name, argv)`` from Pool.saturation_change()."""
        with self.lock:
            self.pending.append(hook + (timeout,))
            if self.running:
                return
            self.running = True
        threading.Thread(target=self._run, name="hooks", daemon=True).start()

    def _run(self):
        while True:
            with self.lock:
                if not self.pending:
                    self.running = False
                    return
                name, argv, timeout = self.pending.popleft()
            run_hook(name, argv, timeout)


###############################################################################
# The session: header -> route -> connect -> relay ############################
###############################################################################


class Session(object):
    """One FastAGI session, from the accepted socket to the access-log line.

    run(), in a worker thread, reads the header, asks the proxy for a route
    and a server slot and connects; then it hands both sockets to the Relay,
    which copies bytes until one side closes.  When no server can be had it
    plays the failure path instead: ``SET VARIABLE <failure_variable>
    <REASON>`` then ``FAILURE``, so Asterisk sets ``AGISTATUS=FAILURE`` and
    the dialplan can read why.
    """

    def __init__(self, proxy, sock, client_address, tls_context=None):
        self.proxy = proxy
        self.settings = proxy.settings
        self.client = sock
        self.client_name = format_address(client_address[0], client_address[1])
        self.client_host = client_address[0]
        self.tls_context = tls_context
        self.upstream = None
        self.member = None
        self.pool = None
        self.route = None
        self.request_url = "-"
        self.started = time.monotonic()
        self.bytes_up = self.bytes_down = 0
        self.end = "error"
        self.abort_reason = None
        self.trial = False      # a half-open try: the server's first byte brings it back
        self.closed = False
        # Relay state, set by start_relay(): per socket, its peer, the bytes
        # waiting to be written to it, and the events the selector watches.
        self.peer = self.outbox = self.interest = None
        self.closing = None     # the socket being flushed before the session ends
        self.closing_since = 0.0
        self.last = self.started

    # -- driving -----------------------------------------------------------

    def run(self):
        self.proxy.session_started(self)
        try:
            if self._serve():
                return          # the relay has the session now
        except Exception:
            log.exception("%s: internal error", self.client_name)
        self.close()

    def close(self):
        """Close both sockets and account for the session, once."""
        if not self.closed:
            self.closed = True
            close_quietly(self.upstream)
            close_quietly(self.client)
            self.proxy.session_ended(self)

    def _serve(self):
        """Header, route, connect; return True once the session is handed to the relay."""
        settings = self.settings
        deadline = self.started + settings.header_timeout
        self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.tls_context is not None:
                self.client = self.tls_context.wrap_socket(self.client, server_side=True,
                                                           do_handshake_on_connect=False)
                tls_handshake(self.client, deadline)
            header, leftover = self.read_header(deadline)
        except (HeaderError, OSError, ValueError) as exc:
            return self.bad_header(describe_header_error(exc))
        url = header.get("agi_request")
        if url is None:
            return self.bad_header("header of %d lines without agi_request" % len(header))
        self.request_url = url
        try:
            request = parse_request(url)
        except ValueError as exc:
            self.fail("BADREQUEST", str(exc))
            return False
        upstream_header = self.connect(request, header)
        if upstream_header is None:
            return False
        self.start_relay(upstream_header + leftover)
        self.proxy.relay.add(self)
        return True

    def bad_header(self, why):
        """Not a FastAGI header: count it, say why, and let the session close (returns False)."""
        self.end = "bad header"
        self.proxy.count_failure("BADHEADER")
        log.warning("%s: %s; closing", self.client_name, why)
        return False

    def read_header(self, deadline):
        """Read the client's header by *deadline*; return ``(AgiHeader, bytes after it)``."""
        settings = self.settings
        self.client.setblocking(False)
        buffer = b""
        while True:
            end = header_end(buffer)
            size = end if end >= 0 else len(buffer)          # the header's bytes so far
            if size > settings.max_header_bytes:
                raise HeaderError("header larger than max_header_bytes = %d" % settings.max_header_bytes)
            if buffer.count(b"\n", 0, size) - (end >= 0) > settings.max_header_lines:   # not the blank line
                raise HeaderError("more than max_header_lines = %d lines" % settings.max_header_lines)
            if end >= 0:
                break
            if buffer[:1] == b"\x16":
                raise HeaderError("TLS handshake on a plain listener")
            if b"\x00" in buffer:
                raise HeaderError("NUL byte in header")
            if b"\n" in buffer:
                AgiHeader.parse(buffer[:buffer.index(b"\n") + 1] + b"\n")   # reject garbage early
            try:
                chunk = self.client.recv(8192)
            except WOULD_BLOCK:     # nothing yet: wait for it, within the header's deadline
                try:
                    wait_for(self.client, READ, deadline - time.monotonic())
                except socket.timeout:
                    raise HeaderError("header incomplete after header_timeout = %gs (%d bytes)"
                                      % (settings.header_timeout, len(buffer)))
                continue
            if not chunk:
                raise HeaderError("client closed after %d bytes, before the end of the header" % len(buffer)
                                  if buffer else "client closed without sending anything")
            buffer += chunk
        pending = getattr(self.client, "pending", None)
        while pending and pending():       # TLS: decrypted bytes after the header would wait for more
            buffer += self.client.recv(8192)
        return AgiHeader.parse(buffer[:end]), buffer[end:]

    def connect(self, request, header):
        """Pick a route and connect to a server; return the header to send it, or None after failing."""
        proxy, settings = self.proxy, self.settings
        route, pool, order, path, query = proxy.decide(request, header, self.client_host)
        self.route, self.pool = route, pool
        if route is None:
            return self.fail("NOROUTE", "no route for %s" % printable(self.request_url))
        budget_deadline = time.monotonic() + settings.connect_budget
        tried = []
        while True:
            member, trial = proxy.reserve(pool, order, tried)
            if member is None:
                reason = trial
                why = "no server could take the session" if tried else \
                    ("every server is busy" if reason == "BUSY" else "every server is down")
                return self.fail(reason, "pool %s: %s" % (pool.name, why))
            tried.append(member)
            self.member, self.trial = member, trial      # ours now: session_ended gives it back
            timeout = min(settings.connect_timeout, budget_deadline - time.monotonic())
            state = member.state
            try:
                if timeout <= 0:
                    raise socket.timeout("connect_budget spent")
                self.upstream = open_connection(state.host, state.port, timeout, member.tls_context)
            except (OSError, ValueError) as exc:
                # neither a connect cut short by the budget nor our own lack of descriptors
                # or memory says anything against the server
                judged = not (isinstance(exc, socket.timeout) and timeout < settings.connect_timeout) and \
                    getattr(exc, "errno", None) not in LOCAL_SHORTAGE
                self.member, self.trial = None, False
                proxy.connect_failed(pool, member, describe_error(exc), trial, judged)
                if time.monotonic() >= budget_deadline:
                    return self.fail("NOUPSTREAM", "pool %s: connect_budget = %gs spent"
                                     % (pool.name, settings.connect_budget))
                continue
            return self.upstream_header(request, header, path, query)

    def upstream_header(self, request, header, path, query):
        """The header to forward to the connected server."""
        return forwarded_header(header, request, self.route, self.pool, self.member.state, path, query,
                                self.client_name if self.settings.forwarded_for else None)

    # -- the failure path --------------------------------------------------

    def fail(self, reason, detail):
        """Tell Asterisk why this session cannot be served, then end it with FAILURE."""
        self.end = reason
        self.proxy.count_failure(reason)
        log.warning("%s: %s %s: %s", self.client_name, reason, printable(self.request_url), detail)
        sock = self.client
        deadline = time.monotonic() + FAILURE_REPLY_TIMEOUT
        try:
            sock.settimeout(FAILURE_REPLY_TIMEOUT)
            sock.sendall(encode("SET VARIABLE %s %s\n" % (self.settings.failure_variable, reason)))
            rest = b""
            while True:    # skip HANGUP lines: the reply to SET VARIABLE starts with a digit
                line, rest = read_line(sock, deadline, rest)
                if not line or line[:1].isdigit():
                    break
            sock.sendall(b"FAILURE\n")
        except (OSError, ValueError):
            pass   # Asterisk hung up or went away: nothing left to tell it

    # -- relaying (see Relay) ---------------------------------------------

    def start_relay(self, to_upstream):
        """Set up the relay state and write what the upstream can take at once."""
        client, upstream = self.client, self.upstream
        self.peer = {client: upstream, upstream: client}
        self.outbox = {client: bytearray(), upstream: bytearray(to_upstream)}
        self.interest = {client: 0, upstream: 0}
        self.bytes_up = len(to_upstream)          # bytes_up counts the forwarded header too
        try:
            del self.outbox[upstream][:upstream.send(to_upstream)]
        except WOULD_BLOCK:
            pass
        except OSError:
            pass                                  # the relay's first write will say what happened

    def side(self, sock):
        return "client" if sock is self.client else "upstream"

    def deadline(self):
        """When the relay must look at this session again: idle, length or flush limit (or None)."""
        if self.closing is not None:
            return self.closing_since + FLUSH_TIMEOUT
        idle, longest = self.settings.idle_timeout, self.settings.max_session_time
        times = ([self.last + idle] if idle else []) + ([self.started + longest] if longest else [])
        return min(times) if times else None

    def abort(self, reason):
        """End the session from another thread (drain timeout, second signal): the
        sockets' shutdown wakes whichever thread has the session."""
        self.abort_reason = reason
        for sock in (self.client, self.upstream):
            try:    # the plain socket's shutdown: SSLSocket's would drop its TLS state under a handshake
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except (OSError, TypeError):
                pass


class _PeerError(OSError):
    """A write failed: *sock*, the side written to, went away (not necessarily the one read)."""

    def __init__(self, sock, error):
        OSError.__init__(self, error.errno, error.strerror or str(error))
        self.sock = sock


class Relay(object):
    """The relay loop: one thread copies the bytes of every session, on one selector.

    A session's worker thread reads the header and connects (work that blocks,
    one call at a time), then hands the session over with add() and goes back
    to the pool.  One thread for all the copying keeps Python's GIL from
    changing hands at every AGI command: with a thread per session that cost
    more CPU than the copying itself (310 futex calls per session, see
    bench/), and every idle call held a thread.

    Nothing here blocks.  Reads and writes are non-blocking; the client is
    read whenever its buffer toward the upstream is under RELAY_BUFFER_LIMIT,
    because Asterisk gives each write only 100 ms.  Bytes are never parsed:
    HANGUP lines and 520 usage blocks pass as they are.  When one side
    closes, what is in flight is flushed to the other as it can take it (at
    most FLUSH_TIMEOUT), which then gets a TLS close_notify and a FIN.
    Idle, length and flush limits sit in a heap.
    """

    def __init__(self, proxy):
        self.proxy = proxy
        self.selector = selectors.DefaultSelector()     # epoll: one descriptor for the whole proxy
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_read.setblocking(False)
        self.wake_write.setblocking(False)
        self.selector.register(self.wake_read, READ)
        self.lock = threading.Lock()
        self.incoming = []
        self.woken = False
        self.timers = []        # heap of (when, sequence, session)
        self.live = 0           # sessions relaying now
        self.sequence = itertools.count()
        self.stopping = False
        self.thread = None

    def start(self):
        # made here, not in __init__: --daemon forks in between, and Python 3.13
        # refuses to start a Thread object created before a fork
        self.thread = threading.Thread(target=self.run, name="relay", daemon=True)
        self.thread.start()

    def stop(self):
        """End the loop; sessions still relaying are closed as "shutdown"."""
        with self.lock:
            self.stopping = True
        self._wake()
        if self.thread is not None:
            self.thread.join(FLUSH_TIMEOUT + 5)

    def add(self, session):
        """Take over a connected session (called from its worker thread)."""
        with self.lock:
            if self.stopping:
                session.end = session.abort_reason or "shutdown"
                session.close()
                return
            self.incoming.append(session)
            wake, self.woken = not self.woken, True
        if wake:
            self._wake()

    def _wake(self):
        try:
            self.wake_write.send(b"\0")
        except OSError:
            pass    # a wake-up is already waiting (buffer full), or we are closing

    def run(self):
        try:
            while not self.stopping:
                try:
                    self._turn()
                except Exception:   # a bug must cost one session, never the loop
                    log.exception("relay loop: internal error")
        finally:
            for key in list(self.selector.get_map().values()):
                if key.data is not None and not key.data[0].closed:
                    self._end(key.data[0], key.data[0].abort_reason or "shutdown")
            self.selector.close()
            self.wake_read.close()
            self.wake_write.close()

    def _turn(self):
        timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else None
        for key, mask in self.selector.select(timeout):
            session = key.data and key.data[0]
            if session is None:
                self._take_incoming()
            elif not session.closed:
                try:
                    self._event(session, key.data[1], mask)
                except Exception:
                    log.exception("%s: relay: internal error", session.client_name)
                    self._end(session, "error")
        if self.timers and self.timers[0][0] <= time.monotonic():
            self._expire()

    def _take_incoming(self):
        try:
            while self.wake_read.recv(4096):
                pass
        except OSError:
            pass
        with self.lock:
            incoming, self.incoming, self.woken = self.incoming, [], False
        for session in incoming:
            self.live += 1
            try:
                self._update(session)
            except (OSError, ValueError) as exc:     # closed under us (an abort): end it here
                self._end(session, session.abort_reason or "error (%s)" % describe_error(exc))
                continue
            self._schedule(session)

    def _schedule(self, session):
        when = session.deadline()
        if when is not None:
            heapq.heappush(self.timers, (when, next(self.sequence), session))

    def _expire(self):
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            session = heapq.heappop(self.timers)[2]
            if session.closed:
                continue
            when = session.deadline()
            if when is not None and when > now:
                heapq.heappush(self.timers, (when, next(self.sequence), session))
            elif session.closing is not None:
                self._end(session, session.end + ", flush timed out")
            else:
                longest = session.settings.max_session_time
                self._end(session, "max_session_time" if longest and now - session.started >= longest
                          else "idle timeout")

    def _event(self, session, sock, mask):
        try:
            if mask & WRITE:
                self._send(sock, session.outbox[sock])
            if mask & READ and session.closing is None:
                self._read(session, sock)
        except (OSError, ValueError) as exc:
            failed = exc.sock if isinstance(exc, _PeerError) else sock
            self._end(session, session.abort_reason or "%s reset (%s)" % (session.side(failed),
                                                                         describe_error(exc)))
            return
        if session.closing is not None and not session.outbox[session.closing]:
            self._finish(session)
        else:
            self._update(session)

    def _read(self, session, sock):
        try:
            data = sock.recv(RELAY_CHUNK)
        except WOULD_BLOCK:
            return
        if not data:
            session.end = session.abort_reason or "%s closed" % session.side(sock)
            session.closing, session.closing_since = session.peer[sock], time.monotonic()
            self._schedule(session)
            return
        pending = getattr(sock, "pending", None)
        while pending and pending():
            data += sock.recv(RELAY_CHUNK)
        peer = session.peer[sock]
        if sock is session.client:
            session.bytes_up += len(data)
        else:
            session.bytes_down += len(data)
            if session.trial:
                session.trial = False
                self.proxy.trial_passed(session.pool, session.member)
        if session.settings.idle_timeout:
            session.last = time.monotonic()
        session.outbox[peer] += data
        self._send(peer, session.outbox[peer])

    @staticmethod
    def _send(sock, buffer):
        """Write as much of *buffer* as the socket takes now and drop it from the buffer."""
        if buffer:
            try:
                sent = sock.send(buffer)
            except WOULD_BLOCK:
                return
            except OSError as exc:
                raise _PeerError(sock, exc)
            del buffer[:sent]

    def _update(self, session):
        """Watch each socket for what it needs now: reads while the peer's buffer has
        room and the session is not closing, writes while there is something to write."""
        for sock in (session.client, session.upstream):
            want = (WRITE if session.outbox[sock] else 0) | \
                (READ if session.closing is None and
                 len(session.outbox[session.peer[sock]]) < RELAY_BUFFER_LIMIT else 0)
            have = session.interest[sock]
            if want != have:
                if not have:
                    self.selector.register(sock, want, (session, sock))
                elif want:
                    self.selector.modify(sock, want, (session, sock))
                else:
                    self.selector.unregister(sock)
                session.interest[sock] = want

    def _finish(self, session):
        """The closing side's peer has everything: close_notify and FIN, then end."""
        sock = session.closing
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock = sock.unwrap()
            sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass    # TLS: close_notify was sent; the peer's answer is not worth waiting for
        self._end(session, session.end)

    def _end(self, session, end):
        session.end = end
        for sock in (session.client, session.upstream):
            if session.interest[sock]:
                try:
                    self.selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
                session.interest[sock] = 0
        session.close()
        self.live -= 1
        if len(self.timers) > 2 * self.live + 64:     # entries of ended sessions: drop them
            self.timers = [entry for entry in self.timers if not entry[2].closed]
            heapq.heapify(self.timers)


def describe_header_error(exc):
    if isinstance(exc, HeaderError):
        return str(exc)
    if isinstance(exc, socket.timeout):
        return "TLS handshake not done within header_timeout"
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed: %s" % (exc.reason or exc)
    return "connection error before the end of the header: %s" % describe_error(exc)


###############################################################################
# The proxy: shared state, listeners, workers and metrics #####################
###############################################################################


class AgiHandler(socketserver.BaseRequestHandler):
    """socketserver's handler: one Session per accepted connection."""

    def handle(self):
        server = self.server
        context = server.proxy.server_context if server.tls else None
        Session(server.proxy, self.request, self.client_address, context).run()


class AgiListener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A listening address.  Connections go to the proxy's warm workers, not new threads."""

    allow_reuse_address = True

    def __init__(self, proxy, address, tls, backlog):
        self.proxy = proxy
        self.tls = tls
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.request_queue_size = backlog
        self.accept_pause = 0.0
        socketserver.TCPServer.__init__(self, address, AgiHandler)

    @property
    def name(self):
        return ("tls " if self.tls else "") + format_address(*self.server_address[:2])

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)

    def get_request(self):
        """accept(), pausing instead of spinning while the process is out of descriptors."""
        try:
            request = self.socket.accept()
        except OSError as exc:
            if exc.errno in LOCAL_SHORTAGE:
                self.accept_pause = min(max(self.accept_pause * 2, 0.01), 1.0)
                self.proxy.limited_log("accept", logging.ERROR, "%s: cannot accept: %s; pausing accepts for %gs",
                                       self.name, describe_error(exc), self.accept_pause)
                time.sleep(self.accept_pause)
            raise
        self.accept_pause = 0.0
        return request

    def verify_request(self, request, client_address):
        return self.proxy.admit(client_address, self.tls)

    def process_request(self, request, client_address):
        self.proxy.accepted()
        try:
            self.proxy.workers.submit(self.process_request_thread, request, client_address)
        except RuntimeError as exc:   # can't start new thread
            self.proxy.accepted(-1)
            self.proxy.limited_log("thread", logging.ERROR, "%s: cannot serve %s: %s",
                                   self.name, client_address[0], exc)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        """ThreadingMixIn's, without closing the socket: the Session owns it and
        closes it itself, in the relay thread if it got that far."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        log.exception("internal error serving %s", client_address[0])


class WorkerPool(object):
    """Warm threads for sessions: a new call reuses an idle thread instead of starting one.

    Threads are started on demand, so there is no cap but the process's; at
    most *spare* idle threads are kept waiting for work.
    """

    def __init__(self, spare):
        self.spare = spare
        self.lock = threading.Lock()
        self.idle = 0
        self.jobs = queue.Queue()

    def submit(self, function, *args):
        with self.lock:
            reuse = self.idle > 0
            if reuse:
                self.idle -= 1
        if reuse:
            self.jobs.put((function, args))
        else:
            threading.Thread(target=self._work, args=((function, args),), daemon=True).start()

    def _work(self, job):
        while job is not None:
            function, args = job
            function(*args)
            with self.lock:
                if self.idle >= self.spare:
                    return
                self.idle += 1
            job = self.jobs.get()

    def stop(self):
        """Let the idle threads end."""
        with self.lock:
            idle, self.idle = self.idle, 0
        for _ in range(idle):
            self.jobs.put(None)


class Stats(object):
    """Proxy-wide counters for the status dump and /metrics (guarded by the proxy's lock)."""

    def __init__(self):
        self.connections = 0
        self.sessions = 0
        self.failures = collections.Counter()
        self.bytes_up = self.bytes_down = 0
        self.buckets = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self.reloads = 0
        self.reload_ok = 1

    def observe(self, duration, bytes_up, bytes_down):
        self.sessions += 1
        self.bytes_up += bytes_up
        self.bytes_down += bytes_down
        self.duration_sum += duration
        for index, bound in enumerate(DURATION_BUCKETS):
            if duration <= bound:
                self.buckets[index] += 1
                break


class Proxy(object):
    """The running proxy: configuration, server state, listeners and live sessions.

    ``lock`` guards the routing tables, every ServerState, the counters and
    the set of sessions.  It is held to pick a route and reserve a slot, never
    across a connect or other I/O.
    """

    def __init__(self, config):
        self.lock = threading.Lock()
        self.config = config
        self.settings = config.settings
        self.upstreams = Upstreams(config)
        self.server_context = make_server_context(config.settings) if config.settings.tls_cert else None
        self.sessions = set()
        self.accepting = 0      # accepted, waiting for a worker: not in sessions yet
        self.active = 0         # sessions holding a server slot (connecting or relaying)
        self.stats = Stats()
        self.listeners = collections.OrderedDict()   # (tls, host, port) as configured -> AgiListener
        self.stats_server = None
        self.checkers = []
        self.workers = WorkerPool(config.settings.spare_threads)
        self.relay = Relay(self)
        self.log_windows = {}
        self.draining = False
        self.daemon = False
        self.wakeup_fd = None

    # -- life cycle --------------------------------------------------------

    def bind(self):
        """Open every listening socket; raise OSError naming the address that failed."""
        self.listeners = self._open_listeners(self.settings, {})
        if self.settings.stats_listen:
            self.stats_server = self._open(lambda: StatsServer(self, self.settings.stats_listen[0]),
                                           "stats_listen", self.settings.stats_listen[0])

    def _open_listeners(self, settings, existing):
        """Return listeners for *settings*, reusing those in *existing*; close new ones on failure."""
        wanted = [(False, a) for a in settings.listen] + [(True, a) for a in settings.tls_listen]
        listeners, opened = collections.OrderedDict(), []
        try:
            for tls, address in wanted:
                key = (tls,) + address
                if key in existing:
                    listeners[key] = existing[key]
                    continue
                listener = self._open(lambda: AgiListener(self, address, tls, settings.backlog),
                                      "tls_listen" if tls else "listen", address)
                opened.append(listener)
                listeners[key] = listener
        except OSError:
            for listener in opened:
                listener.server_close()
            raise
        return listeners

    @staticmethod
    def _open(factory, key, address):
        try:
            return factory()
        except OSError as exc:
            raise OSError(exc.errno, "%s = %s: %s" % (key, format_address(*address), exc.strerror or exc))

    def serve(self):
        """Start serving on every bound listener, the stats endpoint and the health checks."""
        self.relay.start()
        for listener in self.listeners.values():
            self._start_listener(listener)
        if self.stats_server is not None:
            threading.Thread(target=self.stats_server.serve_forever, name="stats", daemon=True).start()
        self._start_checkers()
        for listener in self.listeners.values():
            log.info("listening on %s", listener.name)

    @staticmethod
    def _start_listener(listener):
        threading.Thread(target=listener.serve_forever, args=(0.1,), name="accept " + listener.name,
                         daemon=True).start()

    def _start_checkers(self):
        self.checkers = [HealthChecker(self, pool) for pool in self.upstreams.pools.values()
                         if pool.settings.check != "none"]
        for checker in self.checkers:
            checker.start()

    def _stop_checkers(self):
        for checker in self.checkers:
            checker.stop()
        for checker in self.checkers:
            checker.join(checker.pool.settings.check_timeout * 2 + 1)
        self.checkers = []

    @property
    def addresses(self):
        """The bound addresses as ``(tls, host, port)``, with real port numbers."""
        return [(l.tls,) + tuple(l.server_address[:2]) for l in self.listeners.values()]

    def stop_listening(self):
        """Stop accepting on every listener and close them (a drain's first step)."""
        listeners = list(self.listeners.values())
        stoppers = [threading.Thread(target=l.shutdown) for l in listeners]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for listener in listeners:
            listener.server_close()
        self.listeners = collections.OrderedDict()

    def shutdown(self):
        """Stop everything: listeners, checks, stats endpoint, live sessions and idle workers."""
        self.stop_listening()
        self._stop_checkers()
        if self.stats_server is not None:
            self.stats_server.shutdown()
            self.stats_server.server_close()
            self.stats_server = None
        self.abort_sessions("shutdown")
        self.relay.stop()
        self.workers.stop()

    def reload(self, path):
        """Re-read *path* and switch to it; keep the running configuration if it is invalid."""
        try:
            config = load_config(path)
            server_context = make_server_context(config.settings) if config.settings.tls_cert else None
            upstreams = Upstreams(config, self.upstreams)
            listeners = self._open_listeners(config.settings, self.listeners)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            with self.lock:
                self.stats.reload_ok = 0
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        removed = [l for key, l in self.listeners.items() if key not in listeners]
        added = [l for key, l in listeners.items() if key not in self.listeners]
        needs_restart = [key for key in ("stats_listen", "spare_threads", "backlog")
                         if getattr(config.settings, key) != getattr(self.settings, key)]
        if needs_restart:
            log.warning("%s changed: restart agiproxy to apply (backlog applies to new listeners now)",
                        ", ".join(needs_restart))
        with self.lock:
            self.config, self.settings, self.upstreams = config, config.settings, upstreams
            self.server_context = server_context
            self.listeners = listeners
            self.stats.reloads += 1
            self.stats.reload_ok = 1
        self._stop_checkers()
        self._start_checkers()
        for listener in removed:
            listener.shutdown()
            listener.server_close()
            log.info("stopped listening on %s", listener.name)
        for listener in added:
            self._start_listener(listener)
            log.info("listening on %s", listener.name)
        log.info("configuration reloaded from %s: %d routes, %d pools", path, len(config.routes), len(config.pools))
        return True

    # -- sessions ----------------------------------------------------------

    def accepted(self, count=1):
        """A connection was accepted and queued for a worker (count=-1: it was not)."""
        with self.lock:
            self.accepting += count

    def session_started(self, session):
        with self.lock:
            self.accepting -= 1
            self.sessions.add(session)
            self.stats.connections += 1

    def session_ended(self, session):
        """Give back the session's slot, count it and write its access-log line."""
        now = time.monotonic()
        duration = now - session.started
        hook = None
        with self.lock:
            self.sessions.discard(session)
            member, pool = session.member, session.pool
            if member is not None:
                state = member.state
                state.sessions += 1
                state.bytes_up += session.bytes_up
                state.bytes_down += session.bytes_down
                pool.state.sessions += 1
                self.stats.observe(duration, session.bytes_up, session.bytes_down)
                # closed or reset before saying anything: a crashed app behind a live port
                silent = not session.bytes_down and session.end.startswith("upstream")
                if session.trial:    # the half-open try never heard from the server
                    if silent:
                        self._mark_down(pool, member, "ended the trial session without a command", now, True)
                    else:
                        state.trial = False
                elif session.bytes_down:
                    state.early_closes = 0
                elif silent and pool.settings.early_close_limit:
                    state.early_closes += 1
                    if state.early_closes >= pool.settings.early_close_limit:
                        self._mark_down(pool, member, "ended %d sessions in a row without a command"
                                        % pool.settings.early_close_limit, now)
                hook = self._give_back(pool, member, now)
            drained = self.draining and not self.sessions and not self.accepting
        self._run_hook(pool, hook)
        if session.settings.access_log and log.isEnabledFor(logging.INFO):
            log.info('session client=%s request="%s" route=%s pool=%s server=%s duration=%.3f '
                     'bytes_up=%d bytes_down=%d end="%s"', session.client_name, printable(session.request_url),
                     session.route.name if session.route else "-", session.pool.name if session.pool else "-",
                     member.name if member else "-", duration, session.bytes_up, session.bytes_down, session.end)
        if drained and self.wakeup_fd is not None:     # last: the line above is written before we exit
            try:
                os.write(self.wakeup_fd, b"\x00")
            except OSError:
                pass

    def decide(self, request, header, client_host):
        with self.lock:
            return self.upstreams.decide(request, header, client_host)

    def reserve(self, pool, order, tried):
        """Reserve a slot on the next server of *order*; see Pool.reserve()."""
        hook = None
        with self.lock:
            if self.settings.max_sessions and self.active >= self.settings.max_sessions:
                return None, "BUSY"
            member, reason = pool.reserve(order, tried, time.monotonic())
            if member is not None:
                self.active += 1
                hook = pool.saturation_change(time.monotonic())
        self._run_hook(pool, hook)
        return member, reason

    def connect_failed(self, pool, member, why, trial, judged=True):
        """Give back the slot of a failed connect; *judged*: the failure counts against the server."""
        now = time.monotonic()
        with self.lock:
            member.state.connect_failures += 1
            if judged:
                self._mark_down(pool, member, "connect failed: " + why, now, trial)
            elif trial:
                member.state.trial = False
            hook = self._give_back(pool, member, now)
        self._run_hook(pool, hook)

    def _give_back(self, pool, member, now):
        """With the lock held: free *member*'s slot; return the pool hook now due, if any."""
        member.state.active -= 1
        self.active -= 1
        return pool.saturation_change(now)

    @staticmethod
    def _run_hook(pool, hook):
        if hook:
            pool.state.hooks.submit(hook, pool.settings.hook_timeout)

    def trial_passed(self, pool, member):
        """The half-open try got its first byte from the server: it is back."""
        with self.lock:
            if member.state.mark_up():
                log.warning("server %s of pool %s is up again", member.name, pool.name)

    def check_result(self, pool, member, why):
        """Apply one active check result with HAProxy's rise/fall counting."""
        settings = pool.settings
        with self.lock:
            state = member.state
            if why is None:
                state.check_streak = max(state.check_streak, 0) + 1
                if not state.up and state.check_streak >= settings.rise and state.mark_up():
                    log.warning("server %s of pool %s is up: %d checks passed", member.name, pool.name,
                                settings.rise)
            else:
                state.check_streak = min(state.check_streak, 0) - 1
                log.debug("check of %s in pool %s failed: %s", member.name, pool.name, why)
                if state.up and -state.check_streak >= settings.fall:
                    self._mark_down(pool, member, "%d checks failed, last: %s" % (settings.fall, why),
                                    time.monotonic())

    def _mark_down(self, pool, member, why, now, trial=False):
        """With the lock held: take *member* out of service and say so."""
        settings = pool.settings
        state = member.state
        if state.mark_down(now, why, settings.retry_after, settings.retry_after_max, trial):
            log.warning("server %s of pool %s is down: %s", member.name, pool.name, why)
        elif trial:
            log.info("server %s of pool %s still down, next try in %gs: %s", member.name, pool.name,
                     state.backoff, why)
        if settings.check != "none":
            state.check_streak = min(state.check_streak, 0)

    def count_failure(self, reason):
        with self.lock:
            self.stats.failures[reason] += 1

    def admit(self, client_address, tls):
        """The listener ACL: False (and a rate-limited log line) for a denied client."""
        settings = self.settings
        allow, deny = (settings.tls_allow or settings.allow, settings.tls_deny or settings.deny) if tls \
            else (settings.allow, settings.deny)
        if not allow and not deny:
            return True
        address = ipaddress.ip_address(client_address[0].split("%")[0])
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped
        if not any(address in net for net in deny) and (not allow or any(address in net for net in allow)):
            return True
        self.count_failure("DENIED")
        self.limited_log("deny", logging.WARNING, "%s: denied by %sallow/deny; closed",
                         client_address[0], "tls_" if tls else "")
        return False

    def abort_sessions(self, reason):
        with self.lock:
            sessions = list(self.sessions)
        for session in sessions:
            log.warning("%s: closing session %s on %s: %s", session.client_name, printable(session.request_url),
                        session.member.name if session.member else "-", reason)
            session.abort(reason)
        return len(sessions)

    def wait_sessions(self, timeout):
        """Wait up to *timeout* seconds for live sessions to end; return how many are left."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                left = len(self.sessions)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.01)

    def limited_log(self, key, level, message, *args):
        """Log at most 10 lines per 10 s for *key*, then say how many were left out."""
        now = time.monotonic()
        with self.lock:
            start, shown, dropped = self.log_windows.get(key, (now, 0, 0))
            if now - start >= 10:
                if dropped:
                    log.log(level, "%d similar messages not logged in the last %.0fs", dropped, now - start)
                start, shown, dropped = now, 0, 0
            if shown < 10:
                shown += 1
            else:
                dropped += 1
            self.log_windows[key] = (start, shown, dropped)
        if not dropped:
            log.log(level, message, *args)

    # -- status and metrics ------------------------------------------------

    def status_lines(self):
        """The SIGUSR1 status dump."""
        with self.lock:
            stats = self.stats
            lines = ["status: %d sessions live (%d holding a server slot), %d relayed, %d connections; failures: %s; "
                     "reloads %d" % (len(self.sessions), self.active, stats.sessions, stats.connections,
                                     ", ".join("%s=%d" % kv for kv in sorted(stats.failures.items())) or "none",
                                     stats.reloads)]
            for pool in self.upstreams.pools.values():
                lines.append("pool %s (%s): %d active, %d sessions" % (pool.name, pool.mode, pool.active,
                                                                       pool.state.sessions))
                for member in pool.members:
                    state = member.state
                    lines.append("  server %s%s: %s, %d/%s active, %d sessions, %d connect failures%s" % (
                        member.name, " backup" if member.backup else "", "up" if state.up else "DOWN",
                        state.active, member.max or "-", state.sessions, state.connect_failures,
                        " (%s)" % state.why_down if state.why_down else ""))
        return lines

    def metrics(self):
        """The Prometheus text exposition of the counters."""
        out = []

        def metric(name, kind, helptext, samples):
            out.append("# HELP agiproxy_%s %s\n# TYPE agiproxy_%s %s\n" % (name, helptext, name, kind))
            for labels, value in samples:
                label = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"'))
                                 for k, v in labels)
                out.append("agiproxy_%s%s %s\n" % (name, "{%s}" % label if label else "", value))

        with self.lock:
            stats = self.stats
            members = [(pool, m) for pool in self.upstreams.pools.values() for m in pool.members]
            metric("sessions_active", "gauge", "Sessions holding a server slot (connecting or relaying).",
                   [((), self.active)])
            metric("sessions_total", "counter", "Sessions relayed and ended.", [((), stats.sessions)])
            metric("connections_total", "counter", "Client connections accepted.", [((), stats.connections)])
            metric("failures_total", "counter", "Sessions not relayed, by reason.",
                   [((("reason", r),), n) for r, n in sorted(stats.failures.items())])
            metric("bytes_total", "counter", "Bytes relayed.",
                   [((("direction", "up"),), stats.bytes_up), ((("direction", "down"),), stats.bytes_down)])
            metric("pool_sessions_active", "gauge", "Live sessions per pool.",
                   [((("pool", p.name),), p.active) for p in self.upstreams.pools.values()])
            metric("pool_sessions_total", "counter", "Ended sessions per pool.",
                   [((("pool", p.name),), p.state.sessions) for p in self.upstreams.pools.values()])
            labels = [(("pool", p.name), ("server", m.name)) for p, m in members]
            metric("server_up", "gauge", "1 when the server takes sessions.",
                   [(l, int(m.state.up)) for l, (p, m) in zip(labels, members)])
            metric("server_sessions_active", "gauge", "Live sessions per server.",
                   [(l, m.state.active) for l, (p, m) in zip(labels, members)])
            metric("server_sessions_max", "gauge", "max= of the server line (0: no limit).",
                   [(l, m.max) for l, (p, m) in zip(labels, members)])
            metric("server_sessions_total", "counter", "Ended sessions per server.",
                   [(l, m.state.sessions) for l, (p, m) in zip(labels, members)])
            metric("server_connect_failures_total", "counter", "Failed connects per server.",
                   [(l, m.state.connect_failures) for l, (p, m) in zip(labels, members)])
            cumulative, samples = 0, []
            for bound, count in zip(DURATION_BUCKETS, stats.buckets):
                cumulative += count
                samples.append(((("le", repr(float(bound))),), cumulative))
            samples.append(((("le", "+Inf"),), stats.sessions))
            out.append("# HELP agiproxy_session_duration_seconds Length of relayed sessions.\n"
                       "# TYPE agiproxy_session_duration_seconds histogram\n")
            for labels_, value in samples:
                out.append('agiproxy_session_duration_seconds_bucket{le="%s"} %d\n' % (labels_[0][1], value))
            out.append("agiproxy_session_duration_seconds_sum %.6f\n" % stats.duration_sum)
            out.append("agiproxy_session_duration_seconds_count %d\n" % stats.sessions)
            metric("config_reloads_total", "counter", "Successful configuration reloads.", [((), stats.reloads)])
            metric("config_last_reload_success", "gauge", "1 when the last reload worked.", [((), stats.reload_ok)])
        return "".join(out)


class _StatsHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404, "try /metrics")
            return
        body = self.server.proxy.metrics().encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("stats %s: " + format, self.client_address[0], *args)


class StatsServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """``GET /metrics`` in Prometheus text format (stats_listen)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy, address):
        self.proxy = proxy
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        http.server.HTTPServer.__init__(self, address, _StatsHandler)


###############################################################################
# Logging, signals and the daemon #############################################
###############################################################################


def setup_logging(settings, daemon=False):
    """Send the log where *settings* say (syslog instead of stderr for a daemon).

    Called again on SIGHUP: a log file that stays the same is reopened in place
    (for logrotate) under the handler's lock, so no line is lost or written to
    the rotated file; a new target gets its handler before the old one goes."""
    target = "syslog" if daemon and settings.log == "stderr" else settings.log
    log.setLevel(settings.log_level.upper())
    log.propagate = False
    current = log.handlers[0] if len(log.handlers) == 1 else None
    if current is not None and getattr(current, "agiproxy_target", None) == target:
        if isinstance(current, logging.FileHandler):
            stream = current._open()      # first: if it fails, the old file goes on
            current.acquire()
            try:
                current.stream, old = stream, current.stream
            finally:
                current.release()
            old.close()
        return
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s agiproxy[%(process)d] %(levelname)s %(message)s"))
    elif target == "syslog":
        address = "/dev/log" if os.path.exists("/dev/log") else "/var/run/syslog"
        handler = logging.handlers.SysLogHandler(address, logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("agiproxy[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.FileHandler(target)
        handler.setFormatter(logging.Formatter("%(asctime)s agiproxy[%(process)d] %(levelname)s %(message)s"))
    handler.agiproxy_target = target
    old_handlers = list(log.handlers)
    log.addHandler(handler)
    for old in old_handlers:
        log.removeHandler(old)
        old.close()


def raise_open_file_limit():
    """Raise the soft limit on open files to the hard limit; return the new soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def sd_notify(message):
    """Tell systemd (Type=notify) about our state, when it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode("ascii"), address)
    except OSError as exc:   # e.g. start-stop-daemon --notify-await closes it once we are ready
        log.debug("cannot notify %s: %s", address, describe_error(exc))


def daemonize():
    """Double fork.  Return a function the daemon calls with an exit status once it serves;
    the original process waits for it and exits with that status."""
    ready_read, ready_write = os.pipe()
    if os.fork():
        os.close(ready_write)
        status = os.read(ready_read, 1)
        os._exit(status[0] if status else 1)
    os.close(ready_read)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    def report(status):
        try:
            os.write(ready_write, bytes([status]))
            os.close(ready_write)
        except OSError:
            pass

    return report


def drop_privileges(user, group):
    """Become *user* (and *group*) after the sockets are bound."""
    import grp
    import pwd
    try:
        entry = pwd.getpwnam(user) if user else None
        gid = grp.getgrnam(group).gr_gid if group else (entry.pw_gid if entry else None)
    except KeyError as exc:
        raise ConfigError("unknown user or group: %s" % exc.args[0])
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if entry is not None:
        os.initgroups(entry.pw_name, gid)
        os.setuid(entry.pw_uid)


def _ignore_signal(signum, frame):
    """The work is done by the main loop, woken through signal.set_wakeup_fd()."""


def catch_signals(proxy):
    """Route HUP, TERM, INT and USR1 to the main loop; return the descriptor it waits on.
    Done before the proxy says it is ready, so an early reload cannot kill it."""
    wake_read, wake_write = os.pipe()
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    proxy.wakeup_fd = wake_write
    signal.set_wakeup_fd(wake_write)
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, _ignore_signal)
    return wake_read


def run_until_stopped(proxy, config_path, wake_read):
    """The main loop: HUP reloads, USR1 dumps status, TERM/INT drain, a second TERM/INT exits."""
    deadline = None
    with Selector() as selector:
        selector.register(wake_read, READ)
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            selector.select(timeout)
            try:
                woken = os.read(wake_read, 512)
            except BlockingIOError:
                woken = b""
            for signum in woken:
                if signum == signal.SIGHUP:
                    if proxy.draining:
                        log.warning("SIGHUP ignored while draining")
                        continue
                    sd_notify("RELOADING=1")
                    proxy.reload(config_path)
                    try:
                        setup_logging(proxy.settings, daemon=proxy.daemon)    # reopens the file for logrotate
                    except OSError as exc:
                        log.error("cannot open the log %s: %s; logging as before", proxy.settings.log,
                                  describe_error(exc))
                    sd_notify("READY=1")
                elif signum == signal.SIGUSR1:
                    for line in proxy.status_lines():
                        log.log(max(logging.INFO, log.getEffectiveLevel()), "%s", line)
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    if proxy.draining:
                        left = proxy.abort_sessions("second stop signal")
                        log.warning("second stop signal: exiting now, %d sessions cut", left)
                        return
                    sd_notify("STOPPING=1")
                    with proxy.lock:
                        proxy.draining = True
                    proxy.stop_listening()
                    timeout = proxy.settings.drain_timeout
                    deadline = time.monotonic() + timeout if timeout else None
                    log.warning("stopping: no longer accepting; waiting for %d sessions%s", len(proxy.sessions),
                                " for up to %gs" % timeout if timeout else "")
            if proxy.draining:
                if not proxy.sessions and not proxy.accepting:
                    log.warning("all sessions ended; exiting")
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    proxy.abort_sessions("drain_timeout = %gs reached" % proxy.settings.drain_timeout)
                    proxy.wait_sessions(FLUSH_TIMEOUT + 1)
                    return


###############################################################################
# Probe and explain modes #####################################################
###############################################################################


def probe(url, args=(), variables=None, tls=False, ca=None, insecure=False, reply="200 result=0",
          timeout=10.0, out=sys.stdout):
    """Play Asterisk against the FastAGI server at *url*; print the transcript.

    Returns 0 when the server sent at least one command and did not end with
    FAILURE (after which Asterisk sets AGISTATUS=FAILURE), 1 otherwise.
    """
    if url.lower().startswith("agis://"):
        tls, url = True, "agi://" + url[7:]
    request = parse_request(url)
    started = time.monotonic()

    def say(direction, text):
        out.write("%9.3f ms %s %s\n" % ((time.monotonic() - started) * 1000, direction, text))
        out.flush()

    context = None
    if tls:
        context = ssl.create_default_context(cafile=ca)
        if insecure:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    commands, failed = 0, False
    try:
        sock = open_connection(request.host, request.port or DEFAULT_PORT, timeout, context)
    except (OSError, ValueError) as exc:
        say("!!", "cannot connect to %s: %s" % (request.authority, describe_error(exc)))
        return 1
    try:
        header = synthetic_header(url, args, variables)
        say("->", "connected to %s%s; header of %d lines" % (request.authority, " (TLS)" if tls else "",
                                                             header.count(b"\n") - 1))
        sock.settimeout(timeout)
        sock.sendall(header)
        rest = b""
        while True:
            line, rest = read_line(sock, time.monotonic() + timeout, rest, limit=65536)
            if not line:
                say("<-", "<EOF>")
                break
            say("<-", printable(line.rstrip(b"\r\n")))
            if line.lower().startswith(b"failure"):
                failed = True
                break
            commands += 1
            sock.sendall(encode(reply) + b"\n")
            say("->", reply)
        sock.sendall(b"HANGUP\n")
    except (OSError, ValueError) as exc:
        say("!!", describe_error(exc))
    finally:
        close_quietly(sock)
    out.write("%d command(s) from %s%s\n" % (commands, request.authority,
                                             "; it ended with FAILURE: AGISTATUS=FAILURE" if failed else ""))
    return 0 if commands and not failed else 1


def explain(config, url, variables=None, out=sys.stdout):
    """Print how *url* would be routed (nodast's -t); return 0 if routed, 1 if not."""
    header = AgiHeader.parse(synthetic_header(url, (), variables))
    request = parse_request(url)
    upstreams = Upstreams(config)
    route, pool, order, path, query = upstreams.decide(request, header, "127.0.0.1")
    out.write("request:  %s\n" % url)
    if route is None:
        out.write("route:    none: the session would get %s=NOROUTE and FAILURE\n" % config.settings.failure_variable)
        return 1
    kind = "conditions, in file order" if route.conditional else \
        ("catch-all" if route.path == "*" else "longest path %s" % route.path)
    out.write("route:    %s (%s)\n" % (route.name, kind))
    out.write("pool:     %s (mode %s)\n" % (pool.name, pool.mode))
    for number, member in enumerate(order, 1):
        out.write("server %d: %s%s%s%s\n" % (number, member.name, " weight=%d" % member.weight,
                                            " max=%d" % member.max if member.max else "",
                                            " backup" if member.backup else ""))
    sent = AgiHeader.parse(forwarded_header(header, request, route, pool, order[0].state, path, query,
                                            "127.0.0.1:0" if config.settings.forwarded_for else None))
    for number, name in enumerate(("agi_request", "agi_network_script", "agi_x_fwd_for")):
        if name in sent.variables:
            out.write("%s%s: %s\n" % ("upstream: " if not number else " " * 10, name, sent.get(name)))
    return 0


###############################################################################
# Command line ################################################################
###############################################################################


def parse_variables(pairs):
    variables = collections.OrderedDict()
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not re.match(r"^\w+$", name):
            raise SystemExit("agiproxy: --var expects NAME=VALUE, got %r" % pair)
        variables[name if name.startswith("agi_") else "agi_" + name] = value
    return variables


def build_parser():
    parser = argparse.ArgumentParser(
        prog="agiproxy", description="A reverse proxy for Asterisk FastAGI.",
        epilog="Signals: HUP reloads, TERM/INT drain (twice: exit now), USR1 logs status.")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="configuration file (default %(default)s)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("-t", "--test", metavar="URL", help="explain how URL would be routed, then exit")
    parser.add_argument("--probe", metavar="URL", help="act as Asterisk against a FastAGI server or a proxy")
    parser.add_argument("--var", action="append", metavar="NAME=VALUE", help="header variable for -t/--probe")
    parser.add_argument("--arg", action="append", metavar="ARG", help="agi_arg_N for --probe")
    parser.add_argument("--tls", action="store_true", help="--probe over TLS (also: agis://)")
    parser.add_argument("--ca", help="CA file to verify the --probe TLS server")
    parser.add_argument("--insecure", action="store_true", help="--probe: do not verify the TLS server")
    parser.add_argument("--reply", default="200 result=0", help="--probe's answer to each command")
    parser.add_argument("--timeout", type=float, default=10.0, help="--probe: seconds to wait for each line")
    parser.add_argument("--daemon", action="store_true", help="detach (double fork); log to syslog by default")
    parser.add_argument("--pidfile", help="write the process id here")
    parser.add_argument("--user", help="run as this user once the sockets are bound")
    parser.add_argument("--group", help="run as this group once the sockets are bound")
    parser.add_argument("--version", action="version", version="agiproxy " + __version__)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.config = os.path.abspath(args.config)        # --daemon changes to /; SIGHUP re-reads it
    if args.pidfile:
        args.pidfile = os.path.abspath(args.pidfile)
    if args.probe:
        try:
            return probe(args.probe, args.arg or (), parse_variables(args.var), args.tls, args.ca, args.insecure,
                         args.reply, args.timeout)
        except (ValueError, OSError) as exc:      # a bad URL, an unreadable --ca
            sys.stderr.write("agiproxy: %s\n" % describe_error(exc))
            return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write("agiproxy: %s\n" % exc)
        return 2
    if args.check:
        sys.stdout.write("%s: configuration OK (%d routes, %d pools)\n"
                         % (args.config, len(config.routes), len(config.pools)))
        return 0
    if args.test:
        try:
            return explain(config, args.test, parse_variables(args.var))
        except (ValueError, HeaderError) as exc:
            sys.stderr.write("agiproxy: %s\n" % exc)
            return 2
    return serve(config, args)


def serve(config, args):
    """Run the proxy until a stop signal; return the exit status."""
    try:
        setup_logging(config.settings)
    except OSError as exc:
        sys.stderr.write("agiproxy: %s: log = %s: %s\n" % (args.config, config.settings.log, describe_error(exc)))
        return 2
    threading.stack_size(THREAD_STACK_SIZE)
    files = raise_open_file_limit()
    proxy = Proxy(config)
    proxy.daemon = args.daemon
    try:
        proxy.bind()
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        sd_notify("ERRNO=%d" % (exc.errno or errno.EINVAL))
        return 1
    report = daemonize() if args.daemon else None
    try:
        if args.daemon:
            setup_logging(config.settings, daemon=True)
        if args.pidfile:
            with open(args.pidfile, "w") as handle:
                handle.write("%d\n" % os.getpid())
        if args.user or args.group:
            drop_privileges(args.user, args.group)
    except (OSError, ConfigError) as exc:
        log.error("cannot start: %s", exc)
        sd_notify("ERRNO=%d" % (getattr(exc, "errno", None) or errno.EINVAL))
        if report:
            report(1)
        return 1
    log.info("agiproxy %s on Python %s: %d routes, %d pools; open-file limit %d allows about %d sessions",
             __version__, sys.version.split()[0], len(config.routes), len(config.pools), files, (files - 64) // 2)
    wake_read = catch_signals(proxy)
    proxy.serve()
    sd_notify("READY=1")
    if report:
        report(0)
    try:
        run_until_stopped(proxy, args.config, wake_read)
    finally:
        proxy.shutdown()
        if args.pidfile:
            try:
                os.unlink(args.pidfile)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
