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
    agiproxy.py -c agiproxy.conf --ctl 'set server main/10.0.0.5:4573 state drain'
                                                talk to the running proxy (control_socket)

Signals: HUP reloads the configuration and reopens the log file; TERM or INT
stop accepting and wait for live sessions (a second one exits at once); USR1
writes a status dump to the log.

The whole program is this one file and needs nothing but Python 3.6 or newer.
"""

import argparse
import collections
import errno
import functools
import hashlib
import heapq
import ipaddress
import itertools
import logging
import logging.handlers
import math
import os
import queue
import random
import re
import selectors
import shlex
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import weakref
import configparser
import json

__version__ = "1.1.0"

###############################################################################
# Constants ###################################################################
###############################################################################

DEFAULT_CONFIG = "/usr/local/etc/agiproxy.conf"
DEFAULT_PORT = 4573

#: Bytes read per recv() while relaying; AGI lines are short, 520 usage blocks a few KiB.
RELAY_CHUNK = 16384
#: Bytes buffered toward one side before we stop reading from the other: a
#: sender the other side does not read from pins no more than this.
RELAY_BUFFER_LIMIT = 64 * 1024
#: Time a socket we are done with is read for its EOF before it is closed (see Link.linger).
LINGER_TIMEOUT = 0.5
#: Time the failure path waits for Asterisk's reply to SET VARIABLE.
FAILURE_REPLY_TIMEOUT = 2.0
#: After the application's FIN with a command in flight and Asterisk's answer
#: relayed to it: first look at whether it reset, and how long to keep looking.
FIN_PROBE_STEP = 0.001
FIN_PROBE_LIMIT = 1.0
#: A closing listener keeps accepting this long, so that handshakes under way
#: when it stopped taking new ones are served rather than reset.
DRAIN_ACCEPT_GRACE = 0.1
#: Connections accepted in one go before the relay looks at its sessions again.
ACCEPT_BATCH = 16
#: max_connections = 0: this share of the open-file limit, within these bounds.
AUTO_CONNECTIONS_SHARE, AUTO_CONNECTIONS_MIN, AUTO_CONNECTIONS_MAX = 0.25, 16, 1024
#: Descriptors kept aside from sessions: log file, a health check, a hook, the stats endpoint.
FD_RESERVE = 8
#: Fewer concurrent sessions than this allowed by the open-file limit is worth a warning at start.
SESSIONS_FLOOR = 100
#: Asterisk sends its header right after connecting; the relay waits this long
#: for it before a worker thread takes over the wait (a slow or silent client).
HEADER_GRACE = 0.05
#: Log records waiting for the log writer; past this they are dropped and counted.
LOG_QUEUE_SIZE = 10000
#: Untrusted text (request URLs, header values) is cut to this many characters in the log.
LOG_TEXT_LIMIT = 512
#: The log writer pauses this long after each batch of lines (see LogWriter).
LOG_BATCH_PAUSE = 0.05
#: At exit, how long the queued log lines may take to be written: a stalled log
#: must not keep the process from exiting.
LOG_STOP_TIMEOUT = 5.0
#: Stack size of worker threads: they only read a header and connect, and the
#: default 8 MiB each adds up during a burst of calls.
THREAD_STACK_SIZE = 512 * 1024
#: What of a failed hook's stderr is logged: its last lines, from its last bytes.
HOOK_STDERR_LINES = 5
HOOK_STDERR_TAIL = 4096
#: How often a running hook is looked at for its exit when it writes nothing.
HOOK_POLL_STEP = 0.05
#: How long the addresses of an upstream's host name are used before it is resolved again.
RESOLVE_TTL = 30.0
#: Buckets of the session duration histogram, in seconds.
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
#: Clients the stats endpoint and the control socket each serve at once; past it the
#: oldest one still sending its request is dropped, so a flood cannot lock an operator out.
CONSOLE_CLIENTS = 64
#: Longest request line (control) or request head (HTTP) read.
CONSOLE_REQUEST_LIMIT = 8192
#: How often a "wait server ... empty" looks at the count of live sessions.
WAIT_POLL = 0.02
#: sun_path holds 108 bytes on Linux, the final NUL included.
UNIX_PATH_LIMIT = 107
#: Seconds between reloads of the status page.
STATUS_REFRESH = 5
#: Text columns of a request in "show sessions".
REQUEST_COLUMNS = 60

#: How a session ended.  The first six are failures the dialplan reads in
#: AGIPROXY_STATUS (then AGISTATUS=FAILURE); all show in the access log and /metrics.
NOROUTE = "NOROUTE"             # no route matched the request
NOUPSTREAM = "NOUPSTREAM"       # no server could be reached within connect_budget
BUSY = "BUSY"                   # every server at max=, or max_sessions reached
BADREQUEST = "BADREQUEST"       # agi_request is not an agi:// or hagi:// URL
OVERLOADED = "OVERLOADED"       # agiproxy itself is short of descriptors or memory
UPSTREAMLOST = "UPSTREAMLOST"   # the application went away in the middle of the call
TIMEOUT = "TIMEOUT"             # idle_timeout or max_session_time cut the session
BADHEADER = "BADHEADER"         # not a FastAGI header: closed without a word
COMPLETED = "COMPLETED"         # the application or Asterisk ended the session
CLIENTLOST = "CLIENTLOST"       # Asterisk's side reset
ABORTED = "ABORTED"             # cut by drain_timeout, a second stop signal or a shutdown
INTERNAL = "INTERNAL"           # a bug, logged with its traceback
DENIED = "DENIED"               # refused by allow/deny before a byte was read
REFUSED = "REFUSED"             # max_connections were waiting for a header or a server: closed at accept

#: Admin states of a server in a pool (set server ... state, or drain/maint on its server line).
READY = "ready"     # in service
DRAIN = "drain"     # no new sessions; live ones go on; checks go on
MAINT = "maint"     # no new sessions, no checks
ADMIN_STATES = (READY, DRAIN, MAINT)
#: Every reason, in the order the status page lists its counter.
REASONS = (NOROUTE, NOUPSTREAM, BUSY, BADREQUEST, OVERLOADED, UPSTREAMLOST, TIMEOUT, BADHEADER, COMPLETED,
           CLIENTLOST, ABORTED, INTERNAL, DENIED, REFUSED)

#: How a server ended a session it ended first (passive health).
FIN, RESET = "fin", "reset"
#: Not an end: the answer of a reserve that must not wait (the relay thread's) when the
#: session is to wait in its pool's queue; a worker thread then waits for it.
QUEUE = "QUEUE"
#: Buckets of the time-queued histogram, in seconds.
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30)
#: How often a queued session looks whether Asterisk has hung up meanwhile.
QUEUE_POLL = 0.5
#: A reroute route's request is routed again at most this many times (a longer chain is a loop).
MAX_REROUTES = 4
#: Slow start begins at this fraction of a server's weight and max=.
SLOWSTART_FLOOR = 0.05

#: DNS (servers from resolve and srv lines): the sizes and counts a hostile answer cannot exceed.
DNS_PORT = 53
DNS_UDP_LIMIT = 4096            # bytes read from a UDP answer (we send no EDNS: 512 expected)
DNS_TCP_LIMIT = 65535           # the largest message the 2-byte TCP length allows
DNS_MAX_RECORDS = 256           # answers per message looked at; more is refused
DNS_MAX_POINTERS = 16           # compression pointers followed in one name
DNS_MAX_CNAMES = 8              # CNAME hops followed inside one answer
DNS_MAX_TARGETS = 32            # SRV targets resolved per srv line
#: glibc's resolv.conf defaults and limits (resolv.conf(5)).
RESOLV_CONF = "/etc/resolv.conf"
RESOLV_TIMEOUT, RESOLV_ATTEMPTS, RESOLV_MAX_SERVERS = 5.0, 2, 3
#: Agent checks: the longest line an agent may send.
AGENT_LINE_LIMIT = 512

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


def parse_address_list(text, default_port=DEFAULT_PORT):
    """Return a list of addresses separated by commas or white space."""
    return [parse_address(item, default_port) for item in re.split(r"[\s,]+", text.strip()) if item]


def parse_nameservers(text):
    """Return DNS server addresses (port 53 unless given) separated by commas or white space."""
    return parse_address_list(text, DNS_PORT)


def parse_port(text):
    """Return a TCP port number, 0 for none."""
    port = parse_count(text)
    if port > 65535:
        raise ValueError("expected a port number up to 65535")
    return port


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


def network_allowed(host, allow, deny):
    """The rule of every allow/deny pair: *host* matches no network of *deny*, and one of *allow* when it is set."""
    address = ipaddress.ip_address(host.split("%")[0])
    if getattr(address, "ipv4_mapped", None):
        address = address.ipv4_mapped
    return not any(address in net for net in deny) and (not allow or any(address in net for net in allow))


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
    ("max_match_length", (parse_count, "1024")),
    ("connect_timeout", (parse_duration, "2")),
    ("connect_budget", (parse_duration, "4")),
    ("idle_timeout", (parse_duration, "0")),
    ("fin_timeout", (parse_duration, "5")),
    ("tcp_keepalive_idle", (parse_duration, "30")),
    ("tcp_keepalive_interval", (parse_duration, "10")),
    ("tcp_keepalive_count", (parse_count, "3")),
    ("tcp_user_timeout", (parse_duration, "60")),
    ("max_session_time", (parse_duration, "0")),
    ("max_sessions", (parse_count, "0")),
    ("max_connections", (parse_count, "0")),
    ("failure_variable", (parse_variable_name, "AGIPROXY_STATUS")),
    ("forwarded_for", (parse_boolean, "no")),
    ("log", (text_value, "stderr")),
    ("log_level", (choice("debug", "info", "warning", "error"), "info")),
    ("access_log", (parse_boolean, "yes")),
    ("stats_listen", (parse_address_list, "")),
    ("stats_allow", (parse_networks, "127.0.0.0/8, ::1")),
    ("stats_deny", (parse_networks, "")),
    ("stats_timeout", (parse_duration, "5")),
    ("control_socket", (text_value, "")),
    ("control_group", (text_value, "")),
    ("control_timeout", (parse_duration, "5")),
    ("drain_timeout", (parse_duration, "0")),
    ("spare_threads", (parse_count, "64")),
    ("dns_servers", (parse_nameservers, "")),
])

#: Keys of [pool NAME].
POOL_OPTIONS = collections.OrderedDict([
    ("servers", (text_value, "")),
    ("resolve_interval", (parse_duration, "10")),
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
    ("report_lost", (parse_boolean, "yes")),
    ("fin_in_flight", (choice("success", "failure"), "success")),
    ("check", (choice("none", "tcp", "agi"), "none")),
    ("check_path", (text_value, "agiproxy-check")),
    ("check_interval", (parse_duration, "5")),
    ("check_timeout", (parse_duration, "2")),
    ("rise", (parse_count, "2")),
    ("fall", (parse_count, "3")),
    ("agent_port", (parse_port, "0")),
    ("agent_interval", (parse_duration, "5")),
    ("slowstart", (parse_duration, "0")),
    ("queue_timeout", (parse_duration, "0")),
    ("max_queue", (parse_count, "100")),
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
    ("reroute", (parse_boolean, "no")),
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


ServerSpec = collections.namedtuple("ServerSpec", "host port weight max backup tls tls_verify admin discover "
                                                 "agent_port")
ServerSpec.__new__.__defaults__ = (READY, None, 0)
#: How a server line names its servers: the address itself, every A/AAAA address of
#: the name (resolve), or the SRV records of the name (srv).
RESOLVE, SRV = "resolve", "srv"


def parse_server_line(line, pool_settings):
    """Return a ServerSpec from ``host[:port] [weight=N] [max=N] [backup] [tls] [tls_verify=no]
    [agent_port=N] [resolve] [drain|maint]`` or ``srv NAME [max=N] [tls] [tls_verify=no] [agent_port=N]
    [drain|maint]``."""
    words = line.split()
    discover = None
    if words[0] == "srv":
        if len(words) < 2 or not re.match(r"^[\w.-]+$", words[1]):
            raise ValueError("srv needs a DNS name, such as srv _agi._tcp.example.com")
        discover, host, port, words = SRV, words[1].rstrip(".").lower(), 0, words[1:]
    else:
        host, port = parse_address(words[0])
    weight, maximum, backup, tls, verify, agent_port, admin = 1, 0, False, False, pool_settings.tls_verify, 0, READY
    for word in words[1:]:
        name, _, value = word.partition("=")
        if discover == SRV and (name == "weight" or word in ("backup", "resolve")):
            raise ValueError("%s does not apply to a srv line: priority, weight and port come from the "
                             "SRV records" % name)
        if name == "weight" and value:
            weight = parse_count(value)
            if weight < 1:
                raise ValueError("weight must be 1 or more")
        elif name == "max" and value:
            maximum = parse_count(value)
        elif name == "tls_verify" and value:
            verify = parse_boolean(value)
        elif name == "agent_port" and value:
            agent_port = parse_port(value)
        elif word == "backup":
            backup = True
        elif word == "tls":
            tls = True
        elif word in (DRAIN, MAINT):
            admin = word
        elif word == "resolve":
            if literal_family(host) is not None:
                raise ValueError("resolve needs a host name, not the address %s" % host)
            discover, host = RESOLVE, host.rstrip(".").lower()
        else:
            raise ValueError("unknown server option %r (expected weight=N, max=N, backup, tls, tls_verify=no, "
                             "agent_port=N, resolve, drain, maint)" % word)
    if port == 0 and discover != SRV:
        raise ValueError("server port must not be 0")
    return ServerSpec(host, port, weight, maximum, backup, tls, verify, admin, discover, agent_port)


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
                parse_address_list: [], parse_networks: [], parse_command: [], parse_nameservers: []}


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
    loop = Router(routes).visible_loop()
    if loop:
        raise reader.error("route %s" % loop[0].name, "reroute", "the rewritten request is routed back: %s"
                           % " -> ".join(route.name for route in loop))
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
    if settings.fin_timeout <= 0:
        raise reader.error("agiproxy", "fin_timeout", "must be more than 0")
    if settings.tcp_keepalive_idle and not (settings.tcp_keepalive_interval >= 1 and settings.tcp_keepalive_count):
        raise reader.error("agiproxy", "tcp_keepalive_interval",
                           "tcp_keepalive_interval must be 1s or more and tcp_keepalive_count 1 or more "
                           "(tcp_keepalive_idle = 0 turns keepalive off)")
    if settings.connect_budget < settings.connect_timeout:
        raise reader.error("agiproxy", "connect_budget", "must be at least connect_timeout")
    if settings.max_header_lines < 4:
        raise reader.error("agiproxy", "max_header_lines", "too small for an Asterisk header (at least 4)")
    if settings.max_header_bytes < 256:
        raise reader.error("agiproxy", "max_header_bytes", "too small for an Asterisk header (at least 256)")
    if len(settings.stats_listen) > 1:
        raise reader.error("agiproxy", "stats_listen", "one address only")
    for key in ("stats_timeout", "control_timeout"):
        if getattr(settings, key) <= 0:
            raise reader.error("agiproxy", key, "must be more than 0")
    if settings.control_socket and not settings.control_socket.startswith("/"):
        raise reader.error("agiproxy", "control_socket", "needs an absolute path (--daemon runs in /)")
    if len(settings.control_socket.encode("utf-8")) > UNIX_PATH_LIMIT:
        raise reader.error("agiproxy", "control_socket", "longer than a Unix socket path may be (%d bytes)"
                           % UNIX_PATH_LIMIT)
    if settings.control_group:
        import grp
        try:
            grp.getgrnam(settings.control_group)
        except KeyError:
            raise reader.error("agiproxy", "control_group", "no such group")
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
    if len(set((s.host, s.port, s.tls, s.discover) for s in servers)) != len(servers):
        raise reader.error(section, "servers", "a server is listed twice")
    if (settings.on_saturation or settings.on_recovery) and any(not s.max for s in servers):
        raise reader.error(section, "on_saturation", "needs max=N on every server to know the capacity")
    if settings.tls_client_cert and not settings.tls_client_key:
        raise reader.error(section, "tls_client_key", "needed with tls_client_cert")
    if settings.check != "none" and (settings.rise < 1 or settings.fall < 1):
        raise reader.error(section, "rise", "rise and fall must be 1 or more")
    for key in ("check_interval", "check_timeout", "resolve_interval", "agent_interval"):
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
    if settings.reroute and not settings.rewrite:
        raise reader.error(section, "reroute", "needs rewrite: the rewritten request is what is routed again")
    rewrite_host = None if settings.rewrite_host == "pool" else parse_boolean(settings.rewrite_host)
    route = Route(name, settings.pool, path=settings.path or None, pattern=settings.match,
                  host=settings.host or None, conditions=conditions,
                  rewrite=settings.rewrite or None, rewrite_host=rewrite_host, index=index,
                  reroute=settings.reroute)
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


class HeaderScanner(object):
    """Find the end of a client's header as its bytes arrive, each byte looked at a
    bounded number of times however it is chunked (a dripped header costs what a
    whole one does).

    feed() raises HeaderError as soon as the bytes cannot be a FastAGI header: a
    TLS handshake on a plain listener, a NUL byte, a malformed first line, more
    than max_header_bytes or max_header_lines.  ``done`` is True once the blank
    line has arrived; result() then gives the header and what followed it.
    """

    def __init__(self, settings):
        self.max_bytes, self.max_lines = settings.max_header_bytes, settings.max_header_lines
        self.buffer = bytearray()
        self.lines = 0          # complete lines so far, not counting the blank one
        self.start = 0          # where the line being received starts
        self.end = -1           # just past the blank line, once it is there
        self.first_end = 0      # the end of the first line, until it is checked

    @property
    def done(self):
        return self.end >= 0

    @property
    def size(self):
        return len(self.buffer)

    def feed(self, chunk):
        buffer = self.buffer
        if self.done:           # TLS: bytes decrypted together with the header's end
            buffer += chunk
            return
        if not chunk:
            raise HeaderError("client closed after %d bytes, before the end of the header" % len(buffer)
                              if buffer else "client closed without sending anything")
        if not buffer and chunk[:1] == b"\x16":
            raise HeaderError("TLS handshake on a plain listener")
        old = len(buffer)
        buffer += chunk
        while self.end < 0:
            newline = buffer.find(b"\n", max(self.start, old))     # bytes before old hold no newline
            if newline < 0:
                break
            if newline == self.start or newline == self.start + 1 and buffer[self.start] == 13:
                self.end = newline + 1                      # the blank line
                break
            self.lines += 1
            if self.lines > self.max_lines:
                raise HeaderError("more than max_header_lines = %d lines" % self.max_lines)
            if self.lines == 1:
                self.first_end = newline + 1
            self.start = newline + 1
        if self.first_end and not self.done:    # garbage is rejected early (a whole header: by result())
            AgiHeader.parse(bytes(buffer[:self.first_end]) + b"\n")
            self.first_end = 0
        size = self.end if self.done else len(buffer)
        if size > self.max_bytes:
            raise HeaderError("header larger than max_header_bytes = %d" % self.max_bytes)
        if buffer.find(b"\x00", old, size) >= 0:
            raise HeaderError("NUL byte in header")

    def result(self):
        """``(AgiHeader, bytes after it)``; raise HeaderError for a malformed header."""
        return AgiHeader.parse(bytes(self.buffer[:self.end])), bytes(self.buffer[self.end:])


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
        pairs = _HEADER_VARIABLE.findall(text)
        self.variables = dict(pairs)
        if len(self.variables) != len(pairs):   # Asterisk's setup_env never repeats a name: routing
            seen = set()                        # and a last-one-wins upstream parser would disagree
            repeated = next(name for name, _ in pairs if name in seen or seen.add(name))
            raise HeaderError("header repeats %s" % printable(repeated))

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


def printable(data, limit=LOG_TEXT_LIMIT):
    """A log-safe rendering of untrusted bytes or text, cut to *limit* characters."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "backslashreplace")
    cut = len(data) - limit
    text = data[:limit].encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return text + "...(%d more)" % cut if cut > 0 else text


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
                 rewrite=None, rewrite_host=None, index=0, reroute=False):
        self.name = name
        self.pool = pool
        self.path = path if path in (None, "*") else normalize_path(path)
        self.pattern = pattern
        self.host = host
        self.conditions = list(conditions)
        self.rewrite = rewrite
        self.rewrite_host = rewrite_host
        self.index = index
        self.reroute = reroute      # route the rewritten request again

    @property
    def conditional(self):
        """True for routes tried in file order before plain path routes."""
        return bool(self.pattern or self.host or self.conditions)

    def match(self, request, variables, limit=0):
        """Return the regex groups (possibly empty) when every condition matches, else None.

        A value longer than *limit* characters (0: no limit) matches no regex: it
        is the caller's, and a regex's time can grow fast with its length."""
        if self.path not in (None, "*"):
            path = normalize_path(request.path)
            if path != self.path and not path.startswith(self.path + "/") and self.path != "/":
                return None
        if self.host is not None and request.host.lower() != self.host.lower():
            return None
        for name, regex in self.conditions:
            value = variables.get(name)
            if value is None or limit and len(value) > limit or not regex.search(value):
                return None
        groups = {}
        if self.pattern is not None:
            found = None if limit and len(request.path) > limit else self.pattern.search(request.path)
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
        """Return (path, query) for the upstream: the rewrite template filled in, or the original.

        Header variables come from the caller (caller ID is whatever SIP said), so their
        values are percent-encoded, every byte but ``A-Za-z0-9-._~``: they cannot add a
        query parameter or a path segment.  ``{path}``, ``{query}``, ``{host}`` and the
        regex groups are parts of the agi_request URL, already URL text: pasted as they are."""
        if not self.rewrite:
            return request.path, request.query
        values = dict(groups, path=request.path, query=request.query, host=request.host)

        def fill(match):
            name = match.group(1)
            if name is None:
                return match.group(0)[0]
            if name in values:
                return values[name]
            return urllib.parse.quote(encode(variables.get(name, "")), safe="~")    # "~": as on 3.7+

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

    def __init__(self, routes, max_match_length=0):
        self.routes = list(routes)
        self.limit = max_match_length
        self.tested = sorted({name for route in self.routes for name, _ in route.conditions})
        self.paths_tested = any(route.pattern is not None for route in self.routes)
        self.conditional = [r for r in self.routes if r.conditional]
        self.by_path = sorted((r for r in self.routes if not r.conditional and r.path != "*"),
                              key=lambda r: (-len(r.path), r.index))
        self.catch_all = [r for r in self.routes if not r.conditional and r.path == "*"]

    def route(self, request, variables):
        """Return ``(route, groups)`` for the winning route, or ``(None, None)``."""
        for route in self.conditional + self.by_path + self.catch_all:
            groups = route.match(request, variables, self.limit)
            if groups is not None:
                return route, groups
        return None, None

    def too_long(self, request, variables):
        """Names of the values a regex would have been matched against but for max_match_length."""
        if not self.limit:
            return []
        names = [name for name in self.tested if len(variables.get(name, "")) > self.limit]
        return names + ["the request path"] if self.paths_tested and len(request.path) > self.limit else names

    def hops(self, request, variables):
        """Route *request*, and again after each rewrite of a ``reroute`` route.

        Returns the hops as ``(route, path, query)``: path and query are what
        the route sends on (rewritten or not); the last hop's route is None
        when a rerouted request matches no route.  Raises RerouteError for a
        loop or more than MAX_REROUTES reroutes."""
        hops = []
        while True:
            route, groups = self.route(request, variables)
            if route is None:
                hops.append((None, request.path, request.query))
                return hops
            path, query = route.rewritten(request, variables, groups)
            hops.append((route, path, query))
            if not route.reroute:
                return hops
            if any(hop[0] is route for hop in hops[:-1]) or len(hops) > MAX_REROUTES:
                raise RerouteError("reroute loop: %s" % " -> ".join(hop[0].name for hop in hops))
            request = request._replace(path=path, query=query)

    def visible_loop(self):
        """The routes of a reroute loop that needs no header to happen (rewrites without
        placeholders lead back to where they started), or None."""
        for start in self.routes:
            chain, route = [], start
            while route is not None and route.reroute and not _PLACEHOLDER.search(route.rewrite):
                if route in chain:
                    return chain[chain.index(route):] + [route]
                chain.append(route)
                path, _, query = route.rewrite.partition("?")
                route = self.route(AgiRequest("agi", "", None, "/" + path.lstrip("/"), query), {})[0]
        return None


#: A quantified group with a quantifier inside, such as ``(\d+)+`` or ``(?:a*b?)*``: on a
#: long value that almost matches, Python's re backtracks through every way to split it.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*(?:[+*}]|[^\\]\?)(?:[^()\\]|\\.)*\)(?:[+*]|\{\d*,)")


def regex_warnings(config):
    """What --check warns of in the routes: conditions whose regex can take exponential time."""
    found = []
    for route in config.routes:
        tests = [("match", route.pattern)] if route.pattern is not None else []
        for key, regex in tests + route.conditions:
            nested = _NESTED_QUANTIFIER.search(regex.pattern)
            if nested:
                found.append("route %s: %s = %s: the nested quantifier %s can take exponential time on a value "
                             "that almost matches; write it without repeating a repetition (e.g. \\d+ for (\\d+)+)"
                             % (route.name, key, regex.pattern, nested.group(0)))
    return found


class RerouteError(ValueError):
    """A request that reroute routes would send around in a loop."""


###############################################################################
# DNS messages and resolv.conf (pure: no I/O) #################################
###############################################################################


class DnsError(Exception):
    """No usable DNS answer: a malformed or hostile message, an error code, no reply."""


class DnsMismatch(DnsError):
    """A well-formed message that is not the answer to our query (wrong ID or question)."""


class DnsNameError(DnsError):
    """The name does not exist (NXDOMAIN): an answer, not a reason to ask another server."""


DNS_A, DNS_CNAME, DNS_AAAA, DNS_SRV = 1, 5, 28, 33
DNS_TYPE_NAMES = {DNS_A: "A", DNS_CNAME: "CNAME", DNS_AAAA: "AAAA", DNS_SRV: "SRV"}
DNS_IN = 1
DNS_NOERROR, DNS_SERVFAIL, DNS_NXDOMAIN = 0, 2, 3
_DNS_HEADER = struct.Struct("!HHHHHH")
_DNS_RECORD = struct.Struct("!HHIH")

#: An answer: its RCODE, the TC bit, and the answer records as ``(owner, type, value)``;
#: value is an address string (A, AAAA), a name (CNAME) or ``(priority, weight, port, target)`` (SRV).
DnsAnswer = collections.namedtuple("DnsAnswer", "rcode truncated records")


def encode_dns_name(name):
    """The wire form of a dotted *name*; raise DnsError for one DNS cannot carry."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii", "replace")
        if not 0 < len(raw) <= 63:
            raise DnsError("bad DNS name %r" % name)
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise DnsError("DNS name longer than 255 bytes: %r" % name[:80])
    return bytes(out)


def dns_query(ident, name, qtype):
    """A recursive query for *name* and *qtype* with ID *ident*."""
    return _DNS_HEADER.pack(ident, 0x0100, 1, 0, 0, 0) + encode_dns_name(name) + struct.pack("!HH", qtype, DNS_IN)


def read_dns_name(message, offset):
    """Return ``(name, offset after it)`` for the possibly compressed name at *offset*.

    Every compression pointer must point below every byte the name has used
    so far: a loop (or a chain of forward pointers) cannot be followed, and
    DNS_MAX_POINTERS bounds the work on top of that."""
    labels, length, jumps = [], 0, 0
    position, lowest, end = offset, offset, None
    while True:
        if position >= len(message):
            raise DnsError("name runs past the end of the message")
        size = message[position]
        if size >= 0xC0:
            if position + 1 >= len(message):
                raise DnsError("compression pointer cut off")
            target = (size & 0x3F) << 8 | message[position + 1]
            jumps += 1
            if target >= lowest or jumps > DNS_MAX_POINTERS:
                raise DnsError("compression pointer loop or forward pointer")
            if end is None:
                end = position + 2
            position = lowest = target
            continue
        if size & 0xC0:
            raise DnsError("unknown label type 0x%02x" % size)
        if size == 0:
            return ".".join(labels), end if end is not None else position + 1
        label = message[position + 1:position + 1 + size]
        length += size + 1
        if len(label) < size or length > 255:
            raise DnsError("label cut off or name longer than 255 bytes")
        labels.append(label.decode("latin-1").lower())
        position += 1 + size


def _dns_record_value(message, rtype, start, size):
    data = message[start:start + size]
    if rtype == DNS_A and size == 4:
        return socket.inet_ntop(socket.AF_INET, data)
    if rtype == DNS_AAAA and size == 16:
        return socket.inet_ntop(socket.AF_INET6, data)
    if rtype == DNS_CNAME:
        name, end = read_dns_name(message, start)
    elif rtype == DNS_SRV and size >= 7:
        name, end = read_dns_name(message, start + 6)
    else:
        raise DnsError("%s record of %d bytes" % (DNS_TYPE_NAMES[rtype], size))
    if end > start + size:
        raise DnsError("name runs past its record")
    return name if rtype == DNS_CNAME else struct.unpack("!HHH", data[:6]) + (name,)


def parse_dns_answer(message, ident, name, qtype):
    """Check and parse the answer *message* to our query (*ident*, *name*, *qtype*).

    Raises DnsMismatch when it answers something else, DnsError when it is
    malformed; records of other types and classes are skipped."""
    if len(message) < _DNS_HEADER.size:
        raise DnsError("message of %d bytes" % len(message))
    got_ident, flags, questions, answers, _, _ = _DNS_HEADER.unpack_from(message)
    if got_ident != ident or not flags & 0x8000 or flags & 0x7800:
        raise DnsMismatch("not the answer to our query (ID %d, flags 0x%04x)" % (got_ident, flags))
    if questions != 1:
        raise DnsMismatch("answer with %d questions" % questions)
    asked, offset = read_dns_name(message, _DNS_HEADER.size)
    if offset + 4 > len(message):
        raise DnsError("question cut off")
    if asked != name.rstrip(".").lower() or struct.unpack_from("!HH", message, offset) != (qtype, DNS_IN):
        raise DnsMismatch("answer to another question (%s)" % printable(asked, 80))
    offset += 4
    rcode, truncated = flags & 0x000F, bool(flags & 0x0200)
    if truncated or rcode != DNS_NOERROR:
        return DnsAnswer(rcode, truncated, [])
    if answers > DNS_MAX_RECORDS:
        raise DnsError("%d answer records (more than %d)" % (answers, DNS_MAX_RECORDS))
    records = []
    for _ in range(answers):
        owner, offset = read_dns_name(message, offset)
        if offset + _DNS_RECORD.size > len(message):
            raise DnsError("record cut off")
        rtype, rclass, _, size = _DNS_RECORD.unpack_from(message, offset)
        offset += _DNS_RECORD.size
        if offset + size > len(message):
            raise DnsError("record data runs past the end of the message")
        if rclass == DNS_IN and rtype in DNS_TYPE_NAMES:
            records.append((owner, rtype, _dns_record_value(message, rtype, offset, size)))
        offset += size
    return DnsAnswer(rcode, truncated, records)


def dns_values(records, name, qtype):
    """The values of *qtype* for *name* in *records*, following CNAMEs (at most DNS_MAX_CNAMES)."""
    owners = [name.rstrip(".").lower()]
    aliases = dict((owner, value) for owner, rtype, value in records if rtype == DNS_CNAME)
    while owners[-1] in aliases:
        if len(owners) > DNS_MAX_CNAMES or aliases[owners[-1]] in owners:
            raise DnsError("CNAME chain too long or looping at %s" % printable(owners[-1], 80))
        owners.append(aliases[owners[-1]])
    return [value for owner, rtype, value in records if rtype == qtype and owner in owners]


def parse_resolv_conf(text):
    """Return ``(nameservers, timeout, attempts)`` from resolv.conf *text*, as the C library
    reads it: up to three ``nameserver`` addresses (127.0.0.1 when none), ``options
    timeout:N attempts:N``.  Lines it cannot use are ignored, as the C library does."""
    servers, timeout, attempts = [], RESOLV_TIMEOUT, RESOLV_ATTEMPTS
    for line in text.splitlines():
        words = line.split("#")[0].split(";")[0].split()
        if len(words) >= 2 and words[0] == "nameserver" and len(servers) < RESOLV_MAX_SERVERS:
            if literal_family(words[1].split("%")[0]) is not None:
                servers.append((words[1], DNS_PORT))
        elif words and words[0] == "options":
            for option in words[1:]:
                key, _, value = option.partition(":")
                if key in ("timeout", "attempts") and value.isdigit():
                    if key == "timeout":
                        timeout = float(min(max(int(value), 1), 30))
                    else:
                        attempts = min(max(int(value), 1), 5)
    return servers or [("127.0.0.1", DNS_PORT)], timeout, attempts


###############################################################################
# Upstream pools and health ###################################################
###############################################################################


#: What a server's agent may say of it: take sessions, or none (drain and maint keep
#: the live ones; down is the application saying it cannot work).
AGENT_UP, AGENT_DRAIN, AGENT_MAINT, AGENT_DOWN = "up", "drain", "maint", "down"
_AGENT_WORDS = {"up": AGENT_UP, "ready": AGENT_UP, "drain": AGENT_DRAIN, "maint": AGENT_MAINT,
                "down": AGENT_DOWN, "fail": AGENT_DOWN, "stopped": AGENT_DOWN}


class AgentReport(collections.namedtuple("AgentReport", "state weight maxconn")):
    """The server's state by its agent, its weight as a fraction of the configured one, its
    maxconn (None: max= applies).  The default: the agent has said nothing."""

    __slots__ = ()

    def __new__(cls, state=AGENT_UP, weight=1.0, maxconn=None):
        return super(AgentReport, cls).__new__(cls, state, weight, maxconn)


def parse_agent_line(line, previous=AgentReport()):
    """Return the AgentReport after an agent's answer *line* (HAProxy's agent-check format:
    ``up``, ``ready``, ``drain``, ``maint``, ``down``, ``fail``, ``stopped``, ``NN%``,
    ``maxconn:N``, separated by spaces, tabs or commas; ``#`` starts a free text).  What the
    line does not mention stays as in *previous*.  Raise ValueError for anything else."""
    state, weight, maxconn = previous
    words = [w for w in re.split(r"[\s,]+", line.split("#")[0].strip().lower()) if w]
    if not words:
        raise ValueError("empty answer")
    for word in words:
        percent = re.match(r"^(\d{1,3})%$", word)
        limit = re.match(r"^maxconn:(\d{1,9})$", word)
        if word in _AGENT_WORDS:
            state = _AGENT_WORDS[word]
        elif percent and int(percent.group(1)) <= 256:
            weight = int(percent.group(1)) / 100.0
        elif limit:
            maxconn = int(limit.group(1)) or None
        else:
            raise ValueError("unknown word %s" % printable(word, 40))
    return AgentReport(state, weight, maxconn)


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
        self.since = time.time()    # when it last went up or down (wall clock, for people)
        self.last_check = None      # (when, None or why it failed) of the last active check
        self.admin = {}             # pool name -> READY, DRAIN or MAINT
        self.weights = {}           # pool name -> (weight in the file, weight set at run time)
        self.ends = collections.Counter()   # how the sessions it took ended, by reason
        self.sessions = 0
        self.connect_failures = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.up_since = -math.inf   # when it came back or joined: slow start counts from here
        self.agent = AgentReport()  # what its agent said last

    def available(self, now, trials):
        """Can a session be sent here?  *trials*: may a down server get a half-open try?"""
        return self.agent.state == AGENT_UP and (self.up or (trials and not self.trial and now >= self.retry_at))

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
        self.since = time.time()
        self.early_closes = 0
        return was_up

    def mark_up(self, now=None):
        """Record a success; return True when this brought the server back (its slow start begins)."""
        was_down = not self.up
        self.up, self.trial, self.why_down, self.backoff = True, False, "", 0.0
        if was_down:
            self.since = time.time()
            self.up_since = time.monotonic() if now is None else now
        return was_down

    def set_admin(self, pool, admin, now):
        """Put the server in admin state *admin* for *pool*; return the state it leaves.

        Back to ready, a server that is down gets its half-open try at once
        (pools with checks wait for rise of them: the checks decide there)."""
        before = self.admin.get(pool, READY)
        self.admin[pool] = admin
        if admin == READY and not self.up:
            self.retry_at = min(self.retry_at, now)
        return before

    def judge_session(self, spoke, header_read, upstream_end, trial, early_close_limit):
        """Passive health from one ended session: True when it shows the server works,
        a text when the server is to be taken out of service (why), None when it says
        nothing (Asterisk or a timeout ended it).

        A server that sent a byte works, and so does one that closed cleanly after
        the whole header (an application that logs the call and goes: Asterisk
        reports SUCCESS).  A reset before the server's first byte, or a close
        before the header was sent, is a crashed application behind a live port:
        early_close_limit of them in a row take the server out, and so does one
        in a half-open trial."""
        if spoke or upstream_end == FIN and header_read:
            self.early_closes = 0
            return True
        if upstream_end is None:
            return None
        if trial:
            return "ended the trial session without a command"
        if early_close_limit:
            self.early_closes += 1
            if self.early_closes >= early_close_limit:
                return "ended %d sessions in a row without a command" % early_close_limit
        return None


class Member(object):
    """One server of one pool: the shared state plus this pool's weight, max and flags.

    Its share follows its agent (weight percentage, maxconn) and, for
    ``slowstart`` seconds after it came back or joined, grows linearly from
    SLOWSTART_FLOOR of its weight and max= to all of them."""

    def __init__(self, pool, spec, state, tls_context, agent_port=0):
        self.state = state
        self.pool = pool
        self.file_weight = spec.weight
        file_weight, self.weight = state.weights.get(pool, (spec.weight, spec.weight))
        if file_weight != spec.weight:      # the file changed since weight was set at run time: the file wins
            del state.weights[pool]
            self.weight = spec.weight
        state.admin.setdefault(pool, spec.admin)    # a state set at run time outlives a reload
        self.max = spec.max
        self.backup = spec.backup
        self.tls_context = tls_context   # None for plain TCP
        self.agent_port = spec.agent_port or agent_port
        self.current_weight = 0          # smooth weighted round-robin
        self.retired = False             # gone from DNS: finishes its sessions, takes no new ones

    @property
    def name(self):
        return self.state.name

    def ramp(self, now, slowstart):
        """The fraction of its weight and max= the server has now: 1 unless in slow start."""
        if not slowstart or now - self.state.up_since >= slowstart:
            return 1.0
        return max(SLOWSTART_FLOOR, (now - self.state.up_since) / slowstart)

    def share(self, now, slowstart):
        """The weight it balances with now (0: its agent drained it, or set 0%)."""
        agent = self.state.agent
        return self.weight * agent.weight * self.ramp(now, slowstart) if agent.state == AGENT_UP else 0.0

    def limit(self, now, slowstart):
        """The most sessions it may have now, 0 for no limit: max= (or the agent's maxconn), ramped."""
        agent_max = self.state.agent.maxconn
        limit = agent_max if agent_max is not None and (not self.max or agent_max < self.max) else self.max
        return int(math.ceil(limit * self.ramp(now, slowstart))) if limit else 0

    def full(self, now=0.0, slowstart=0):
        limit = self.limit(now, slowstart)
        return bool(limit) and self.state.active >= limit

    @property
    def admin(self):
        return self.state.admin.get(self.pool, READY)

    def set_weight(self, weight):
        """A weight set at run time: kept by a reload unless the file's weight for it changes."""
        self.weight = weight
        self.state.weights[self.pool] = (self.file_weight, weight)


class Histogram(object):
    """A Prometheus histogram's counts: observations at or below each of *bounds*, their sum."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count, self.sum = 0, 0.0

    def observe(self, value):
        self.count += 1
        self.sum += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break

    def lines(self, name, labels=""):
        """The exposition lines of agiproxy_*name*: cumulative buckets, sum, count.
        *labels* are the series' own, written before ``le`` (``pool="x",``)."""
        out, cumulative = [], 0
        for bound, count in zip(self.bounds, self.counts):
            cumulative += count
            out.append('agiproxy_%s_bucket{%sle="%r"} %d\n' % (name, labels, float(bound), cumulative))
        out.append('agiproxy_%s_bucket{%sle="+Inf"} %d\n' % (name, labels, self.count))
        series = "{%s}" % labels.rstrip(",") if labels else ""
        out.append("agiproxy_%s_sum%s %.6f\n" % (name, series, self.sum))
        out.append("agiproxy_%s_count%s %d\n" % (name, series, self.count))
        return out


class PoolState(object):
    """What a pool keeps across reloads, shared by its old and new Pool objects
    (guarded by the proxy's lock): ended sessions, saturation, its hook runner."""

    def __init__(self):
        self.sessions = 0
        self.saturated = False
        self.saturation_hook_at = -math.inf
        self.hooks = HookRunner()
        self.queue = collections.deque()     # QueueTickets of sessions waiting for a slot, oldest first
        self.queue_timeouts = 0
        self.queued = Histogram(QUEUE_BUCKETS)   # how long sessions waited in the queue
        self.discovered = {}                 # server line -> entries of its last good lookup
        self.lookup_failing = set()          # server lines whose lookups fail now (logged once)



class QueueTicket(object):
    """A session's place in its pool's queue; ``ready`` is set when it may try for a slot."""

    def __init__(self):
        self.ready = threading.Event()


class Pool(object):
    """The servers of a [pool] section and the policy for choosing among them.

    The members are the servers named by address, then those found in DNS for
    its resolve and srv lines (set_discovered(), from the discovery thread).
    order() and reserve() are called with the proxy's lock held; they do no I/O.
    """

    def __init__(self, spec, states):
        self.name = spec.name
        self.settings = spec.settings
        self.mode = spec.settings.mode
        self.contexts = {}
        self.lines = [server for server in spec.servers if server.discover]
        self.found = dict((line, []) for line in self.lines)     # line -> its members from DNS
        self.layout = [server if server.discover else self._member(server, states) for server in spec.servers]
        self.named = [m for m in self.layout if isinstance(m, Member)]
        self.rotation = 0
        self.random = random.Random()
        self.state = PoolState()
        self._arrange_members()

    def _member(self, server, states):
        context = None
        if server.tls:
            if server.tls_verify not in self.contexts:
                self.contexts[server.tls_verify] = make_client_context(self.settings, server.tls_verify)
            context = self.contexts[server.tls_verify]
        key = (server.host, server.port, server.tls)
        state = states.setdefault(key, ServerState(server.host, server.port, server.tls))
        return Member(self.name, server, state, context, self.settings.agent_port)

    def _arrange_members(self):
        self.members = [m for item in self.layout                  # in file order, as failover needs
                        for m in ([item] if isinstance(item, Member) else self.found[item])]
        self.primaries = [m for m in self.members if not m.backup]
        self.backups = [m for m in self.members if m.backup]
        self.capacity = sum(m.max for m in self.members) if all(m.max for m in self.members) else 0

    def set_discovered(self, line, entries, states, now, joining=True):
        """Make the servers of *line* those of *entries* (``(address, port, weight, backup)``).

        New ones join (in slow start when *joining*); vanished ones are retired:
        live sessions finish, no new one goes there.  Returns ``(joined, left)`` names."""
        self.state.discovered[line] = entries
        old = dict(((m.state.host, m.state.port), m) for m in self.found[line])
        taken = set((m.state.host, m.state.port) for m in self.members if m not in self.found[line])
        members, joined = [], []
        for host, port, weight, backup in entries:
            if (host, port) in taken:
                continue
            taken.add((host, port))
            member = old.pop((host, port), None)
            if member is None:
                joined.append(format_address(host, port))
            if member is None or (member.weight, member.backup) != (weight, backup):
                fresh = states.get((host, port, line.tls)) is None
                member = self._member(line._replace(host=host, port=port, weight=weight, backup=backup,
                                                    discover=None), states)
                if fresh and joining:
                    member.state.up_since = now
            members.append(member)
        for member in old.values():
            member.retired = True
        self.found[line] = members
        self._arrange_members()
        return joined, [m.name for m in old.values()]

    @property
    def active(self):
        return sum(m.state.active for m in self.members)

    @property
    def trials(self):
        """Half-open tries are for pools without active checks; checks decide otherwise."""
        return self.settings.check == "none"

    def order(self, variables, client_host="", now=None):
        """Return every member in the order this session should try them."""
        now = time.monotonic() if now is None else now
        return self._arrange(self.primaries, variables, client_host, now) + \
            self._arrange(self.backups, variables, client_host, now)

    def _arrange(self, members, variables, client_host, now):
        slowstart = self.settings.slowstart
        if len(members) < 2:
            return list(members)
        if self.mode == "failover":     # a server in slow start comes first for its share of sessions only
            ramping = [m for m in members if m.ramp(now, slowstart) < 1 and
                       self.random.random() >= m.ramp(now, slowstart)]
            return [m for m in members if m not in ramping] + ramping
        self.rotation += 1
        shares = dict((m, m.share(now, slowstart)) for m in members)
        if self.mode == "round-robin":
            candidates = [m for m in members if shares[m]] or members     # a drained one must not pile up debt
            total = sum(shares.values())
            for member in candidates:
                member.current_weight += shares[member]
            chosen = max(candidates, key=lambda m: m.current_weight)
            chosen.current_weight -= total
            start = members.index(chosen)
            return members[start:] + members[:start]
        if self.mode == "least-sessions":
            count = len(members)
            return sorted(members, key=lambda m: (m.state.active / shares[m] if shares[m] else math.inf,
                                                  (members.index(m) - self.rotation) % count))
        key = variables.get(self.settings.hash) or client_host
        return sorted(members, key=lambda m: rendezvous_score(key, m.name, shares[m]), reverse=True)

    def reserve(self, order, tried, now):
        """Take a session slot on the first member of *order* that can have one.

        Returns ``(member, trial)`` where *trial* is True for a half-open try
        of a down server, or ``(None, reason)`` with reason BUSY when a usable
        server was only skipped for being at max, else NOUPSTREAM.
        """
        busy = False
        slowstart = self.settings.slowstart
        for member in order:
            state = member.state
            if member in tried or member.retired or member.admin != READY or \
                    not state.available(now, self.trials) or not state.agent.weight:
                continue
            if member.full(now, slowstart):
                busy = True
                continue
            trial = not state.up
            state.trial = state.trial or trial
            state.active += 1
            return member, trial
        return None, BUSY if busy else NOUPSTREAM

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
    if not weight:
        return 0.0
    digest = hashlib.sha256(("%s\x00%s" % (key, server)).encode("utf-8", "surrogateescape")).digest()
    unit = (int.from_bytes(digest[:8], "big") + 1) / float(2 ** 64 + 1)
    return -weight / math.log(unit)


class Upstreams(object):
    """Routes and pools of one configuration, with server state carried over from the last one."""

    def __init__(self, config, previous=None):
        self.config = config
        self.states = {}
        # Every ServerState still referenced (by this configuration, an older one or a
        # session that counts on it): a server removed and re-added while an old session
        # lives gets its old state back, and max= holds.
        self.known = previous.known if previous else weakref.WeakValueDictionary()
        old_pools = previous.pools if previous else {}
        self.pools = collections.OrderedDict()
        for name, spec in config.pools.items():
            shared = {}
            for server in spec.servers:
                key = (server.host, server.port, server.tls)
                if not server.discover:
                    shared[key] = self.states.get(key) or self.known.get(key) or ServerState(*key)
                    self.known[key] = shared[key]
            pool = Pool(spec, shared)
            self.states.update(shared)
            if name in old_pools:
                pool.state = old_pools[name].state
                for line in pool.lines:     # what DNS said last, until it is asked again
                    entries = pool.state.discovered.get(line)
                    if entries:
                        for host, port, _, _ in entries:
                            key = (host, port, line.tls)
                            if key in self.known and key not in self.states:
                                self.states[key] = self.known[key]
                        pool.set_discovered(line, entries, self.states, 0.0, joining=False)
            self.pools[name] = pool
        self.router = Router(config.routes, config.settings.max_match_length)

    def route(self, request, header):
        """Return ``(route, pool, upstream_path, upstream_query)``; route is None for no route.

        Pure, and this object does not change once built: no lock is needed (pool.order()
        needs one).  Raises RerouteError for a request that reroute routes send around in a loop."""
        route, path, query = self.router.hops(request, header.variables)[-1]
        if route is None:
            return None, None, path, query
        return route, self.pools[route.pool], path, query

    def forget_unused(self):
        """Drop the state of servers no pool has any more and no session holds (DNS churn)."""
        used = set(id(m.state) for pool in self.pools.values() for m in pool.members)
        for key, state in list(self.states.items()):
            if id(state) not in used and not state.active:
                del self.states[key]


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
#: Linux gives an accepted socket the listening socket's TCP options (NODELAY,
#: keepalive), so they are set once on the listener instead of per connection.
OPTIONS_INHERITED = sys.platform.startswith("linux")
#: errno values that mean this process, not the peer, ran short.
LOCAL_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: What a non-blocking read or write raises when it would have to wait.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


#: OpenSSL 3 reports a TLS peer that closes without close_notify as an error;
#: FastAGI peers commonly do, and for a line protocol a close is a close.
#: (ssl.OP_IGNORE_UNEXPECTED_EOF from Python 3.10; the same bit before it.)
IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF",
                                0x80 if ssl.OPENSSL_VERSION_INFO >= (3,) else 0)


#: TLS 1.2 renegotiation would make a read need a write (and the reverse) in the
#: middle of a session; nothing in FastAGI needs it, so it is refused where
#: OpenSSL can (ssl.OP_NO_RENEGOTIATION from Python 3.7; the same bit before it).
NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0x40000000 if ssl.OPENSSL_VERSION_INFO >= (1, 1, 0, 8) else 0)


def _require_tls12(context):
    if hasattr(context, "minimum_version"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin (guarded: 3.7+)
    else:  # Python 3.6
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    context.options |= IGNORE_UNEXPECTED_EOF | NO_RENEGOTIATION


def make_server_context(settings):
    """The TLS context of tls_listen: our certificate, and client certificates when tls_client_ca is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _require_tls12(context)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.tls_client_ca)
    return context


#: Certificate checks Python 3.13's create_default_context() adds: X.509 strict mode (a
#: private CA without key usage or a critical basicConstraints is rejected) and partial
#: chains.  They are cleared, so that verification is the same on 3.6 .. 3.13 and an
#: interpreter upgrade cannot turn a working upstream into NOUPSTREAM.
VERIFY_FLAGS_SINCE_313 = getattr(ssl, "VERIFY_X509_STRICT", 0) | getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)


def make_client_context(settings, verify):
    """The TLS context toward a pool's servers; *verify* checks certificate and host name."""
    context = ssl.create_default_context(cafile=settings.tls_ca or None)
    context.verify_flags &= ~VERIFY_FLAGS_SINCE_313
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


def begin_connect(host, port, address=None):
    """Start a non-blocking connect to the IP address *host*, or to *address* (a
    ``(family, sockaddr)`` from getaddrinfo); return the socket."""
    family, sockaddr = address or (literal_family(host), (host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    error = sock.connect_ex(sockaddr)
    if error not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
        sock.close()
        raise OSError(error, os.strerror(error))
    return sock


class Resolver(object):
    """getaddrinfo() with a deadline.  The C call cannot be interrupted, so it runs in
    a thread of its own (one per name at a time, shared by every connect waiting
    for it) and the caller waits for it only until its deadline; an answer is kept
    RESOLVE_TTL seconds, so a slow resolver costs one wait, not one per call."""

    class Lookup(object):
        def __init__(self):
            self.done = threading.Event()
            self.addresses, self.error = [], None

    def __init__(self):
        self.lock = threading.Lock()
        self.answers = {}           # (host, port) -> (expiry, [(family, sockaddr)])
        self.lookups = {}           # (host, port) -> Lookup under way

    def resolve(self, host, port, timeout):
        """Return ``[(family, sockaddr)]`` for *host*; raise socket.timeout after *timeout* seconds."""
        key, now, start = (host, port), time.monotonic(), False
        with self.lock:
            answer = self.answers.get(key)
            if answer is not None and answer[0] > now:
                return answer[1]
            lookup = self.lookups.get(key)
            if lookup is None:
                lookup = self.lookups[key] = self.Lookup()
                start = True
        if start:
            try:
                threading.Thread(target=self._look_up, args=(key, lookup), name="resolve", daemon=True).start()
            except RuntimeError as exc:     # can't start new thread
                self._answer(key, lookup, [], OSError(errno.ENOMEM, "cannot resolve %s: %s" % (host, exc)))
        if not lookup.done.wait(max(timeout, 0)):
            raise socket.timeout("resolving %s timed out" % host)
        if lookup.error is not None:
            raise lookup.error.__class__(*lookup.error.args)   # a copy: other threads raise it too
        return lookup.addresses

    def _look_up(self, key, lookup):
        try:
            found = socket.getaddrinfo(key[0], key[1], 0, socket.SOCK_STREAM)
            self._answer(key, lookup, [(info[0], info[4]) for info in found], None)
        except (OSError, UnicodeError) as exc:
            self._answer(key, lookup, [], exc)

    def _answer(self, key, lookup, addresses, error):
        now = time.monotonic()
        with self.lock:
            del self.lookups[key]
            if error is None:
                self.answers = {k: v for k, v in self.answers.items() if v[0] > now}
                self.answers[key] = (now + RESOLVE_TTL, addresses)
        lookup.addresses, lookup.error = addresses, error
        lookup.done.set()


RESOLVER = Resolver()


def tune_socket(sock, settings, upstream=False):
    """TCP_NODELAY (AGI is one line at a time) and keepalive, so that a peer host that
    vanished is noticed; toward an upstream also TCP_USER_TIMEOUT, for bytes it never
    acknowledges.  Options the platform lacks are skipped."""
    for level, option, value in socket_options(settings.tcp_keepalive_idle, settings.tcp_keepalive_interval,
                                               settings.tcp_keepalive_count,
                                               settings.tcp_user_timeout if upstream else 0):
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


@functools.lru_cache(maxsize=8)
def socket_options(keepalive_idle, keepalive_interval, keepalive_count, user_timeout):
    """tune_socket()'s options, resolved once per configuration (it runs for every connection)."""
    options = [(socket.IPPROTO_TCP, "TCP_NODELAY", 1)]
    if keepalive_idle:
        options += [(socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
                    (socket.IPPROTO_TCP, "TCP_KEEPIDLE", max(1, int(keepalive_idle))),
                    (socket.IPPROTO_TCP, "TCP_KEEPINTVL", max(1, int(keepalive_interval))),
                    (socket.IPPROTO_TCP, "TCP_KEEPCNT", max(1, keepalive_count))]
    if user_timeout:
        options.append((socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", int(user_timeout * 1000)))
    return tuple((level, getattr(socket, name), value) for level, name, value in options if hasattr(socket, name))


#: Linux's TCP_INFO, for peer_gone(); TCP_CLOSE is the state a reset leaves.
TCP_INFO = getattr(socket, "TCP_INFO", None)
TCP_CLOSE = 7
#: Classic BPF for a listening socket (filters see the TCP header): drop a
#: segment with SYN and without ACK, pass everything else.  A dropped SYN is
#: sent again a second later and finds the port closed: refused.
SO_ATTACH_FILTER = 26
DROP_SYN_FILTER = [(0x30, 0, 0, 13),            # A = TCP flags
                   (0x54, 0, 0, 0x12),          # A &= SYN|ACK
                   (0x15, 0, 1, 0x02),          # A == SYN ?
                   (0x06, 0, 0, 0),             #   drop
                   (0x06, 0, 0, 0xffffffff)]    #   else keep


def attach_filter(sock, program):
    """Attach a classic BPF *program* (``(code, jt, jf, k)`` tuples) to *sock*; False where
    the platform cannot (not Linux, no ctypes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
    except ImportError:
        return False
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                        struct.pack("HP", len(program), ctypes.addressof(code)))
        return True
    except OSError:
        return False


def refuse_new_connections(listening):
    """Make the kernel stop completing new connections to *listening* while those it
    has completed wait to be accepted (closing it would reset them)."""
    return attach_filter(listening, DROP_SYN_FILTER)


def open_connection(host, port, timeout, tls_context=None, settings=None, address_timeout=None):
    """Connect to an upstream within *timeout* seconds: name resolution, every address
    of the name, the TLS handshake; return the socket.  *address_timeout* (default
    *timeout*) bounds the connect to each address and the handshake.

    An IP literal is connected to directly: getaddrinfo() and the IDNA codec
    cost more than the rest of the connect on loopback."""
    deadline = time.monotonic() + timeout
    each = min(address_timeout or timeout, timeout)
    family = literal_family(host)
    addresses = [(family, (host, port))] if family else RESOLVER.resolve(host, port, timeout)
    sock = _connect_first(host, port, addresses, deadline, each)
    try:
        if settings is not None:
            tune_socket(sock, settings, upstream=True)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
            tls_handshake(sock, min(deadline, time.monotonic() + each))
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def _connect_first(host, port, addresses, deadline, each):
    """The first of *addresses* that takes a connect, each given *each* seconds, all by *deadline*."""
    error = socket.timeout("timed out")
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            sock = begin_connect(host, port, address)
        except OSError as exc:
            if exc.errno in LOCAL_SHORTAGE:     # ours, not the address's: no point trying the next
                raise
            error = exc
            continue
        try:
            wait_for(sock, WRITE, min(each, remaining))
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not code:
                return sock
            error = OSError(code, os.strerror(code))
        except OSError as exc:
            error = exc
        sock.close()
    raise error


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


#: What Asterisk answers a command on a hung-up channel: the reply a check gives after its HANGUP.
DEAD_CHANNEL_REPLY = b"511 Command Not Permitted on a dead channel or intercept routine\n"


class CheckSkipped(str):
    """Why a check could not run: this process ran short (LOCAL_SHORTAGE), which says nothing of the server."""


def check_server(member, settings):
    """Run one active check of *member*; return None when healthy, a CheckSkipped, else why not."""
    deadline = time.monotonic() + settings.check_timeout
    sock = None
    try:
        state = member.state
        sock = open_connection(state.host, state.port, settings.check_timeout, member.tls_context)
        if settings.check == "agi":
            url = "agi://%s/%s" % (format_address(state.host, state.port), settings.check_path.lstrip("/"))
            return agi_check(sock, url, deadline)
        # A reset, not a FIN: the server's first read fails instead of finding an EOF where a
        # header should be (panoramisk's header loop spins at 100% CPU on that EOF).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return None
    except (OSError, ValueError) as exc:
        if getattr(exc, "errno", None) in LOCAL_SHORTAGE:
            return CheckSkipped(describe_error(exc))
        return describe_error(exc)
    finally:
        close_quietly(sock)


def agi_check(sock, url, deadline):
    """Play Asterisk for one check session on *sock*: None when the server ran it, else why not.

    The first command gets ``200 result=0``, then the channel "hangs up" as Asterisk
    says it (``HANGUP``, then 511 to every command) until the server closes or the
    deadline passes.  A ``FAILURE`` line (Asterisk's test: any line starting with it)
    fails the check: the server has no handler for check_path."""
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    sock.sendall(synthetic_header(url))
    line, rest = read_line(sock, deadline)
    if not line:
        return "closed without sending a command"
    reply = b"200 result=0\nHANGUP\n"
    while line:
        if line[:7].lower() == b"failure":
            return "answered FAILURE: no handler for check_path"
        sock.sendall(reply)
        reply = DEAD_CHANNEL_REPLY
        try:
            line, rest = read_line(sock, deadline, rest)
        except (socket.timeout, ConnectionError):
            return None         # it ran the command; holding on or resetting after HANGUP is its business
    return None


def describe_error(exc):
    """A short text for a socket, TLS or parse error."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return "TLS: %s" % (exc.reason or exc)
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


class PoolThread(threading.Thread):
    """A background thread of one pool (checks, agents, DNS): runs until stop()."""

    #: Its threads are called KIND-POOL.
    kind = "pool"

    def __init__(self, proxy, pool):
        threading.Thread.__init__(self, name="%s-%s" % (self.kind, pool.name), daemon=True)
        self.proxy, self.pool = proxy, pool
        self.stopping = threading.Event()

    def stop(self):
        self.stopping.set()


class HealthChecker(PoolThread):
    """Check every server of one pool each ``check_interval`` until stop()."""

    kind = "check"

    def run(self):
        settings = self.pool.settings
        while not self.stopping.is_set():
            for member in self.pool.members:
                if member.admin == MAINT:
                    continue
                why = check_server(member, settings)
                if self.stopping.is_set():      # stopped meanwhile (a reload): not ours to apply
                    return
                self.proxy.check_result(self.pool, member, why)
            self.stopping.wait(settings.check_interval)


def check_agent(member, settings):
    """Ask *member*'s agent how the server is; return its answer line, or raise OSError/ValueError."""
    deadline = time.monotonic() + settings.check_timeout
    sock = open_connection(member.state.host, member.agent_port, settings.check_timeout)
    try:
        line, _ = read_line(sock, deadline, limit=AGENT_LINE_LIMIT)
        if not line:
            raise ValueError("closed without an answer")
        return decode(line).strip()
    finally:
        close_quietly(sock)


class AgentChecker(PoolThread):
    """Ask the agent of every server of one pool that has an agent_port, each ``agent_interval``."""

    kind = "agent"

    def run(self):
        settings = self.pool.settings
        while not self.stopping.is_set():
            for member in list(self.pool.members):
                if self.stopping.is_set():
                    return
                if member.agent_port:
                    try:
                        self.proxy.agent_said(self.pool, member, check_agent(member, settings))
                    except (OSError, ValueError) as exc:
                        self.proxy.limited_log("agent", logging.WARNING, "agent of %s in pool %s: %s; ignored",
                                               member.name, self.pool.name, describe_error(exc))
            self.stopping.wait(settings.agent_interval)


def run_hook(name, argv, timeout):
    """Run one hook command and wait for it; kill it after *timeout* seconds.

    The hook leads its own process group, so a shell script's children are
    killed with it; the last HOOK_STDERR_TAIL bytes of its stderr are logged
    when it fails."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
    except OSError as exc:
        log.error("%s hook %s could not start: %s", name, argv[0], describe_error(exc))
        return
    with process.stderr:
        tail, timed_out = _stderr_tail(process, time.monotonic() + timeout)
    if timed_out:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        process.wait()
        log.error("%s hook %s still running after %gs: killed with its process group%s",
                  name, argv[0], timeout, _said(tail))
        return
    code = process.wait()
    if code:
        log.warning("%s hook %s exited with status %d%s", name, " ".join(argv), code, _said(tail))
    else:
        log.info("%s hook %s done", name, " ".join(argv))


def _stderr_tail(process, deadline):
    """Read *process*'s stderr until it exits or *deadline*; return (its last bytes, timed out?).

    Not until EOF: a child the hook left running in the background may hold the pipe."""
    tail, reading = b"", True
    with Selector() as selector:
        selector.register(process.stderr, READ)
        while True:
            exited = process.poll() is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0:      # (an exited hook's background child may write on for ever)
                return tail, not exited
            if reading and selector.select(0 if exited else min(remaining, HOOK_POLL_STEP)):
                chunk = os.read(process.stderr.fileno(), 4096)
                tail = (tail + chunk)[-HOOK_STDERR_TAIL:]
                if not chunk:       # every writer closed it: only the exit is left to wait for
                    selector.unregister(process.stderr)
                    reading = False
            elif exited:
                return tail, False
            elif not reading:
                try:
                    process.wait(min(remaining, HOOK_POLL_STEP))
                except subprocess.TimeoutExpired:
                    pass


def _said(tail):
    lines = decode(tail).strip().splitlines()[-HOOK_STDERR_LINES:]
    return "; stderr: %s" % printable(" | ".join(lines)) if lines else ""


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
# DNS: the client and the discovery of servers ################################
###############################################################################

_dns_random = random.SystemRandom()


class DnsClient(object):
    """A small stub resolver: UDP to each nameserver in turn (TCP when the answer is
    truncated), ``attempts`` rounds of ``timeout`` seconds each, as the C library
    does with resolv.conf.  Names are taken as absolute (no search domains).

    Answers are checked before they are believed: the ID and the question must
    be ours (other datagrams are ignored while the timeout lasts) and the
    message must parse within the bounds of parse_dns_answer()."""

    def __init__(self, servers, timeout=RESOLV_TIMEOUT, attempts=RESOLV_ATTEMPTS):
        self.servers, self.timeout, self.attempts = list(servers), timeout, attempts

    @classmethod
    def configured(cls, settings, path=RESOLV_CONF):
        """The client for *settings*: dns_servers if set, else resolv.conf's nameservers;
        resolv.conf's timeout and attempts either way."""
        try:
            with open(path) as handle:
                text = handle.read(65536)
        except (OSError, UnicodeDecodeError):
            text = ""
        servers, timeout, attempts = parse_resolv_conf(text)
        return cls(settings.dns_servers or servers, timeout, attempts)

    def query(self, name, qtype):
        """Return the values of *qtype* for *name* (empty: the name has no such record).

        Raises DnsNameError for NXDOMAIN, DnsError when no server gave an answer."""
        why = "no nameserver"
        for _ in range(self.attempts):
            for server in self.servers:
                try:
                    answer = self._ask(server, name, qtype)
                except (OSError, DnsError) as exc:
                    why = "%s: %s" % (format_address(*server), describe_error(exc))
                    continue
                if answer.rcode == DNS_NXDOMAIN:
                    raise DnsNameError("%s: no such name (NXDOMAIN)" % name)
                if answer.rcode == DNS_NOERROR:
                    return dns_values(answer.records, name, qtype)
                why = "%s: RCODE %d%s" % (format_address(*server), answer.rcode,
                                          " (SERVFAIL)" if answer.rcode == DNS_SERVFAIL else "")
        raise DnsError("%s %s: %s" % (name, DNS_TYPE_NAMES[qtype], why))

    def addresses(self, name):
        """Every A and AAAA address of *name*, sorted."""
        found = self.query(name, DNS_A) + self.query(name, DNS_AAAA)
        return sorted(set(found), key=lambda a: (":" in a, a))

    def _ask(self, server, name, qtype):
        ident = _dns_random.getrandbits(16)
        message = dns_query(ident, name, qtype)
        answer = self._udp(server, message, ident, name, qtype)
        if answer.truncated:
            answer = self._tcp(server, message, ident, name, qtype)
            if answer.truncated:
                raise DnsError("truncated answer over TCP")
        return answer

    def _udp(self, server, message, ident, name, qtype):
        deadline = time.monotonic() + self.timeout
        with socket.socket(literal_family(server[0].split("%")[0]), socket.SOCK_DGRAM) as sock:
            sock.connect(server)        # datagrams from anyone else are not ours
            sock.send(message)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("timed out")
                sock.settimeout(remaining)
                data = sock.recv(DNS_UDP_LIMIT)
                try:
                    return parse_dns_answer(data, ident, name, qtype)
                except DnsMismatch:
                    continue            # a late or forged answer: wait for ours

    def _tcp(self, server, message, ident, name, qtype):
        deadline = time.monotonic() + self.timeout
        with socket.create_connection(server, self.timeout) as sock:
            sock.sendall(struct.pack("!H", len(message)) + message)
            size = struct.unpack("!H", self._read(sock, 2, deadline))[0]
            return parse_dns_answer(self._read(sock, size, deadline), ident, name, qtype)

    @staticmethod
    def _read(sock, size, deadline):
        data = b""
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(remaining)
            chunk = sock.recv(min(size - len(data), DNS_TCP_LIMIT))
            if not chunk:
                raise DnsError("TCP answer cut off after %d of %d bytes" % (len(data), size))
            data += chunk
        return data


def discover(line, client):
    """The servers a resolve or srv *line* names now: ``[(address, port, weight, backup)]``.

    SRV: the lowest priority present gives the primary servers, higher ones
    backups; a record's weight is the server's weight (0 counts as 1); target
    ``.`` (no service) is skipped.  Raises DnsError when nothing is found."""
    if line.discover == RESOLVE:
        entries = [(address, line.port, line.weight, line.backup) for address in client.addresses(line.host)]
    else:
        records = sorted(set(client.query(line.host, DNS_SRV)))[:DNS_MAX_TARGETS]
        records = [r for r in records if r[3] and r[2]]
        best = min(r[0] for r in records) if records else 0
        entries = [(address, port, max(weight, 1), priority != best)
                   for priority, weight, port, target in records for address in client.addresses(target)]
    if not entries:
        raise DnsError("%s %s: no address" % (line.discover, line.host))
    return entries


class Discoverer(PoolThread):
    """Look up the resolve and srv lines of one pool each ``resolve_interval``, off every
    session's path, and hand what DNS says to the proxy."""

    kind = "dns"

    def __init__(self, proxy, pool):
        PoolThread.__init__(self, proxy, pool)
        self.client = DnsClient.configured(proxy.settings)

    def run(self):
        while not self.stopping.is_set():
            for line in self.pool.lines:
                if self.stopping.is_set():
                    return
                try:
                    self.proxy.discovered(self.pool, line, discover(line, self.client), None)
                except (DnsError, OSError, ValueError) as exc:
                    self.proxy.discovered(self.pool, line, None, describe_error(exc))
                except Exception:   # a bug must cost one lookup, never the pool's discovery
                    log.exception("pool %s: lookup of %s %s: internal error", self.pool.name, line.discover,
                                  line.host)
            self.stopping.wait(self.pool.settings.resolve_interval)


###############################################################################
# The session: its record and the steps that open it ##########################
###############################################################################


class Session(object):
    """One FastAGI session, from the accepted connection to its access-log line.

    It is the record of who called, what was asked, which server took it and
    how it ended, and it holds the steps that open it: take the header,
    choose a route, reserve a server, connect.  The steps are the same
    wherever they run: inline in the relay thread when nothing has to wait
    (a plain client whose header has arrived, an upstream that is an IP
    address), else in a worker thread (open_blocking()): a TLS handshake, a
    header still arriving, a host name to resolve, a TLS upstream.
    """

    #: A held call costs what its record needs: no per-object dict.
    __slots__ = ("abort_reason", "attempt_timeout", "budget_deadline", "bytes_down", "bytes_up",
                 "client", "client_address", "client_host", "client_name", "closed",
                 "connect_deadline", "detail", "end", "header", "header_read", "leftover",
                 "listener", "member", "order", "path", "pool", "proxy", "query", "request",
                 "request_url", "route", "scanner", "settings", "started", "ticket", "tls_context",
                 "trial", "tried", "upstream", "upstream_end")

    def __init__(self, proxy, sock, client_address, listener):
        self.proxy = proxy
        self.settings = proxy.settings
        self.client = sock
        self.client_address = client_address
        self.client_name = format_address(client_address[0], client_address[1])
        self.client_host = client_address[0]
        self.listener = listener
        self.tls_context = proxy.server_context if listener.tls else None
        self.scanner = HeaderScanner(self.settings)
        self.upstream = None
        self.request_url = "-"
        self.header = self.request = None
        self.leftover = b""         # what the client sent after its header
        self.route = self.pool = self.member = None
        self.order, self.tried = [], []
        self.path = self.query = None
        self.trial = False          # a half-open try: the server's first byte brings it back
        self.started = time.monotonic()
        self.budget_deadline = 0.0  # connect_budget: when trying servers ends
        self.attempt_timeout = 0.0  # the time the current connect may take
        self.connect_deadline = 0.0
        self.bytes_up = self.bytes_down = 0
        self.header_read = False    # the server read the whole header before its FIN
        self.upstream_end = None    # FIN or RESET when the server ended the session first
        self.end, self.detail = None, ""
        self.abort_reason = None
        self.ticket = None          # its place in the pool's queue while it waits there
        self.closed = False

    # -- the steps ---------------------------------------------------------

    def take_header(self):
        """Choose the route for the complete header; return a failure ``(reason, detail)`` or None."""
        header = self.header
        url = header.get("agi_request")
        if url is None:
            return BADHEADER, "header of %d lines without agi_request" % len(header)
        self.request_url = url
        try:
            self.request = parse_request(url)
        except ValueError as exc:
            return BADREQUEST, str(exc)
        try:
            self.route, self.pool, self.order, self.path, self.query = \
                self.proxy.decide(self.request, header, self.client_host)
        except RerouteError as exc:
            return BADREQUEST, "%s: %s" % (exc, printable(url))
        if self.route is None:
            return NOROUTE, "no route for %s" % printable(url)
        self.budget_deadline = time.monotonic() + self.settings.connect_budget
        return None

    def reserve(self, wait=False):
        """Reserve a slot on the next server to try; return a failure ``(reason, detail)`` or None.

        A session that is to queue gets ``(QUEUE, ...)`` unless it may *wait*:
        then it waits here, in arrival order, up to the pool's queue_timeout, and
        its connect_budget starts once it has the slot."""
        queued = time.monotonic()
        member, trial = self.proxy.reserve(self.pool, self.order, self.tried, self if wait else None)
        if member is None:
            if trial == QUEUE:
                return QUEUE, "pool %s: every server is busy; queued" % self.pool.name
            why = "no server could take the session" if self.tried else \
                ("every server is busy" if trial == BUSY else "every server is down or out of service (drain, maint)")
            settings = self.pool.settings
            if trial == CLIENTLOST:
                return CLIENTLOST, "pool %s: Asterisk hung up while queued %.3fs" % (self.pool.name,
                                                                                   time.monotonic() - queued)
            if wait and trial == BUSY and settings.queue_timeout:
                waited = time.monotonic() - queued
                why += " (queued %.3fs, queue_timeout = %gs)" % (waited, settings.queue_timeout) \
                    if waited >= settings.queue_timeout \
                    else " (max_queue = %d sessions already queued)" % settings.max_queue
            return trial, "pool %s: %s" % (self.pool.name, why)
        if self.ticket is not None:     # it queued: the queue's time is not the connect budget's
            self.ticket = None
            self.budget_deadline = time.monotonic() + self.settings.connect_budget
        self.tried.append(member)
        self.member, self.trial = member, trial       # ours now: the session's end gives it back
        now = time.monotonic()
        self.attempt_timeout = min(self.settings.connect_timeout, self.budget_deadline - now)
        self.connect_deadline = now + self.attempt_timeout
        return None

    def connects_inline(self):
        """True when the reserved server can be connected to without blocking: plain TCP to an IP address."""
        return self.member.tls_context is None and literal_family(self.member.state.host) is not None

    def connect_failed(self, exc):
        """The connect to the reserved server failed; give the slot back.  Return a failure, or None to try the next."""
        member, pool, settings, trial = self.member, self.pool, self.settings, self.trial
        self.member, self.trial = None, False
        shortage = getattr(exc, "errno", None) in LOCAL_SHORTAGE
        # neither a connect cut short by the budget nor our own shortage says anything against the server
        judged = not shortage and not (isinstance(exc, socket.timeout) and
                                       self.attempt_timeout < settings.connect_timeout)
        self.proxy.connect_failed(pool, member, describe_error(exc), trial, judged, shortage)
        if shortage:
            return OVERLOADED, "cannot connect to %s: %s (agiproxy is short of it, not the server)" % (
                member.name, describe_error(exc))
        if time.monotonic() >= self.budget_deadline:
            return NOUPSTREAM, "pool %s: connect_budget = %gs spent" % (pool.name, settings.connect_budget)
        return None

    def forwarded(self):
        """The header to send the reserved server, and what the client sent after it."""
        return forwarded_header(self.header, self.request, self.route, self.pool, self.member.state,
                                self.path, self.query,
                                self.client_name if self.settings.forwarded_for else None) + self.leftover

    def release_header(self):
        """The header is forwarded: drop it (and the servers to try), so that a held call
        costs what its record needs."""
        self.header = self.scanner = self.request = self.path = self.query = None
        self.leftover = b""
        self.order = self.tried = ()

    # -- the waiting path --------------------------------------------------

    def open_blocking(self):
        """In a worker thread: finish opening the session, then hand it to the relay."""
        try:
            failure = self._open_blocking()
        except Exception:
            log.exception("%s: internal error", self.client_name)
            failure = INTERNAL, "internal error"
        self.proxy.relay.add(self, failure)

    def _open_blocking(self):
        if self.header is None:
            try:
                self._read_header(self.started + self.settings.header_timeout)
            except (HeaderError, OSError, ValueError) as exc:
                return BADHEADER, describe_header_error(exc)
            failure = self.take_header()
            if failure:
                return failure
        while True:
            if self.member is None:
                failure = self.reserve(wait=True)
                if failure:
                    return failure
            state = self.member.state
            try:
                if self.attempt_timeout <= 0:
                    raise socket.timeout("connect_budget spent")
                self.upstream = open_connection(state.host, state.port, self.budget_deadline - time.monotonic(),
                                                self.member.tls_context, self.settings, self.attempt_timeout)
                return None
            except (OSError, ValueError) as exc:
                failure = self.connect_failed(exc)
                if failure:
                    return failure

    def _read_header(self, deadline):
        """Read the rest of the header by *deadline* (after a TLS handshake on a TLS listener)."""
        if self.tls_context is not None:
            self.client = self.tls_context.wrap_socket(self.client, server_side=True,
                                                       do_handshake_on_connect=False)
            tls_handshake(self.client, deadline)
        while not self.scanner.done:
            try:
                chunk = self.client.recv(8192)
            except WOULD_BLOCK:     # nothing yet: wait for it, within the header's deadline
                try:
                    wait_for(self.client, READ, deadline - time.monotonic())
                except socket.timeout:
                    raise HeaderError("header incomplete after header_timeout = %gs (%d bytes)"
                                      % (self.settings.header_timeout, self.scanner.size))
                continue
            self.scanner.feed(chunk)
        pending = getattr(self.client, "pending", None)
        while pending and pending():       # TLS: decrypted bytes after the header would wait for more
            self.scanner.feed(self.client.recv(8192))
        self.header, self.leftover = self.scanner.result()

    def caller_gone(self):
        """While queued: has Asterisk hung up (its HANGUP line, or EOF)?  Only plain
        connections can be peeked at; a TLS caller is found gone when its turn comes."""
        if isinstance(self.client, ssl.SSLSocket):
            return False
        try:
            data = self.client.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except WOULD_BLOCK:
            return False
        except OSError:
            return True
        return not data or data.startswith(b"HANGUP")

    # -- control from other threads ---------------------------------------

    def abort(self, reason):
        """End the session from another thread (drain timeout, second signal): the
        sockets' shutdown wakes whichever thread has the session."""
        self.abort_reason = reason
        ticket = self.ticket
        if ticket is not None:      # waiting in a queue: wake it
            ticket.ready.set()
        for sock in (self.client, self.upstream):
            try:    # the plain socket's shutdown: SSLSocket's would drop its TLS state under a handshake
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except (OSError, TypeError):
                pass


def describe_header_error(exc):
    if isinstance(exc, HeaderError):
        return str(exc)
    if isinstance(exc, socket.timeout):
        return "TLS handshake not done within header_timeout"
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed: %s" % (exc.reason or exc)
    return "connection error before the end of the header: %s" % describe_error(exc)


###############################################################################
# The relay: two pipes per session, and the failure path ######################
###############################################################################


def shut_write(sock):
    """End our direction of *sock*: TLS close_notify, then a FIN.  Reading goes on."""
    if isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()       # sends close_notify; the peer's answer is not waited for
        except (OSError, ValueError):
            pass
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError:
        pass


def peer_gone(sock):
    """After a write to a peer that sent its FIN: True once it answered with a reset (its
    process is gone), False once it acknowledged the bytes (it still reads), None while
    unknown.  Linux's TCP_INFO tells; elsewhere only a failed write does."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 32)
    except (OSError, TypeError):
        return None
    state, unacked = info[0], struct.unpack_from("I", info, 24)[0]
    if state == TCP_CLOSE:
        return True
    return False if not unacked else None


class Pipe(object):
    """One direction of a session: what is read from *source* is written to *sink*.

    A pipe is OPEN while it relays; at EOF once its source has sent its FIN
    (what is buffered is still written); SHUT once it has shut its sink's
    write side, or its sink went away: that direction is done.  ``hold``
    keeps an EOF pipe from shutting its sink (while the failure path may
    still write to Asterisk).  TLS may need the other readiness to go on (a
    renegotiation, a key update): ``read_on`` and ``write_on`` are the events
    the next recv and send wait for.  A source of None is agiproxy itself.
    """

    #: Slots, not a per-object dict: every held call has two pipes.
    __slots__ = ("buffer", "hold", "read_on", "sent", "sink", "source", "state", "tls", "write_on")

    OPEN, EOF, SHUT = "open", "eof", "shut"

    def __init__(self, source, sink):
        self.source, self.sink = source, sink
        self.buffer = bytearray()
        self.state = Pipe.OPEN if source is not None else Pipe.EOF
        self.hold = source is None
        self.sent = 0
        self.read_on, self.write_on = READ, WRITE
        self.tls = isinstance(source, ssl.SSLSocket)

    def readable(self):
        return self.state == Pipe.OPEN and len(self.buffer) < RELAY_BUFFER_LIMIT

    def receive(self):
        """Read what the source has now: bytes, b'' at its EOF, or None when there is nothing."""
        try:
            data = self.source.recv(RELAY_CHUNK)
        except ssl.SSLWantWriteError:
            self.read_on = WRITE
            return None
        except WOULD_BLOCK:
            self.read_on = READ
            return None
        self.read_on = READ
        if not data:
            self.state = Pipe.EOF
            return data
        if self.tls:
            while self.source.pending():    # decrypted TLS bytes that no event would announce
                data += self.source.recv(RELAY_CHUNK)
        return data

    def flush(self):
        """Write what the sink takes now; shut its write side once an EOF pipe is empty.
        Raise OSError when the sink has gone."""
        if self.sink is None:
            del self.buffer[:]
        while self.buffer:
            try:
                sent = self.sink.send(self.buffer)
            except ssl.SSLWantReadError:
                self.write_on = READ
                return
            except WOULD_BLOCK:
                self.write_on = WRITE
                return
            del self.buffer[:sent]
            self.sent += sent
        self.write_on = WRITE
        if self.state == Pipe.EOF and not self.hold:
            self.state = Pipe.SHUT
            if self.sink is not None:
                shut_write(self.sink)

    def sink_lost(self):
        """The sink went away: nothing more can be written to it; return the source, which
        is now only to be read to its end (None when there is none)."""
        del self.buffer[:]
        self.sink = None
        source = self.source if self.state == Pipe.OPEN else None
        self.source_lost()
        return source

    def source_lost(self):
        """The source went away: write what is buffered, then end."""
        if self.state == Pipe.OPEN:
            self.state = Pipe.EOF
        self.source = None


#: A chunk from Asterisk made of these bytes only is HANGUP lines: not an answer to a command.
HANGUP_BYTES = b"HANGUP\r\n"


class Link(object):
    """A session in the relay: its two pipes and the phase it is in.

    HEADER: the client's header is arriving (inline path, for HEADER_GRACE).
    CONNECTING: the upstream connect is under way (inline path).
    RELAYING: both pipes copy bytes; which side spoke last, per chunk, says
    whether a command is in flight (sent by the application, not yet
    answered by Asterisk).
    FIN_IN_FLIGHT: the application sent its FIN with a command in flight.
    Asterisk's answer is still relayed to it; then a reset says the
    application is gone (UPSTREAMLOST), an acknowledgement that it still
    reads (a half-close: the FIN goes on to Asterisk).
    FAILING: agiproxy talks to Asterisk itself: after Asterisk answered any
    command in flight, ``SET VARIABLE <failure_variable> <REASON>``, its
    reply, then ``FAILURE`` (or nothing, to leave AGISTATUS=SUCCESS).
    ENDING: one side has ended; the other may finish within fin_timeout.
    The session closes once both pipes are SHUT and every source has sent its
    EOF, so a close never resets bytes the peer has not read.
    """

    #: Slots, not a per-object dict: every held call has one link.
    __slots__ = ("down", "failure_final", "failure_step", "header_size", "interest", "last",
                 "last_chunk", "lingering", "phase", "pipes", "probe_at", "probe_started",
                 "probe_step", "reply", "scheduled", "session", "settings", "since", "timed", "up",
                 "upstream_spoke_last")

    HEADER, CONNECTING, RELAYING, FIN_IN_FLIGHT, FAILING, ENDING = \
        "header", "connecting", "relaying", "fin-in-flight", "failing", "ending"
    #: Steps of the failure path.
    ANSWER, REPLY, TOLD = "answer", "reply", "told"

    def __init__(self, session, phase):
        self.session = session
        self.phase = phase
        client, upstream = session.client, session.upstream
        self.up = Pipe(client, upstream)
        self.down = Pipe(upstream, client)
        self.pipes = (self.up, self.down)
        self.interest = [0, 0]      # events registered for the client's socket and the upstream's
        self.upstream_spoke_last = False
        self.last = session.started
        self.since = 0.0            # when the current phase's own clock started
        self.probe_at = None        # FIN_IN_FLIGHT: when to ask the kernel about the upstream
        self.failure_step = None
        self.failure_final = b""
        self.reply = b""
        self.lingering = None       # sockets read only to reach their EOF -> until when (a dict)
        self.settings = session.settings
        self.header_size = None     # bytes of the forwarded header, once connected
        self.scheduled = None       # the earliest deadline in the relay's heap
        self.probe_started = self.probe_step = 0.0
        self.last_chunk = b""       # the application's last bytes, for said_failure()
        self.timed = bool(self.settings.idle_timeout or self.settings.max_session_time)

    def events_for(self, sock):
        """The events the relay must watch on *sock* now."""
        if self.phase == Link.HEADER:
            return READ
        if self.phase == Link.CONNECTING:
            return WRITE if sock is self.session.upstream else 0
        events = READ if self.lingering and sock in self.lingering else 0
        for pipe in self.pipes:
            if pipe.source is sock and pipe.readable():
                events |= pipe.read_on
            if pipe.sink is sock and (pipe.buffer or (pipe.state == Pipe.EOF and not pipe.hold)):
                events |= pipe.write_on
        return events

    def deadline(self):
        """When the relay must look at this session again, or None."""
        settings, session = self.settings, self.session
        if self.phase == Link.HEADER:
            return session.started + HEADER_GRACE
        if self.phase == Link.CONNECTING:
            return session.connect_deadline
        if self.phase == Link.RELAYING and not (self.timed or self.lingering):
            return None             # the common case, at every event: nothing to wait for
        times = list(self.lingering.values()) if self.lingering else []
        if self.phase in (Link.RELAYING, Link.FIN_IN_FLIGHT):
            if settings.idle_timeout:
                times.append(self.last + settings.idle_timeout)
            if settings.max_session_time:
                times.append(session.started + settings.max_session_time)
            if self.probe_at is not None:
                times.append(self.probe_at)
        elif self.phase == Link.FAILING and self.failure_step == Link.REPLY:
            times.append(self.since + FAILURE_REPLY_TIMEOUT)
        elif self.phase == Link.ENDING or self.failure_step == Link.TOLD:
            times.append(self.since + settings.fin_timeout)
        return min(times) if times else None

    def finished(self):
        """Both directions done (a SHUT pipe has read its source's EOF) and nothing left to linger on."""
        return self.up.state == Pipe.SHUT and self.down.state == Pipe.SHUT and \
            not self.lingering and self.phase not in (Link.HEADER, Link.CONNECTING)

    # -- what the relay saw ------------------------------------------------

    def received(self, pipe, data, now):
        """Bytes from a pipe's source: relay them, or hand Asterisk's to the failure path."""
        session = self.session
        if pipe is self.up:
            session.bytes_up += len(data)
            answer = bool(data.strip(HANGUP_BYTES))
            if self.phase == Link.FAILING:
                self.failure_input(data, answer, now)
                return
            if answer:
                self.upstream_spoke_last = False
        else:
            session.bytes_down += len(data)
            self.upstream_spoke_last = True
            self.last_chunk = data
            if session.trial:
                session.trial = False
                session.proxy.trial_passed(session.pool, session.member)
        self.last = now
        pipe.buffer += data

    def source_ended(self, pipe, now):
        """A pipe's source sent its FIN."""
        session = self.session
        if pipe is self.down:
            if self.phase == Link.RELAYING:
                session.upstream_end, session.header_read = FIN, self.header_read()
                if self.upstream_spoke_last and session.pool.settings.report_lost and not self.said_failure():
                    self.phase, pipe.hold = Link.FIN_IN_FLIGHT, True    # Asterisk's answer decides
                else:
                    self.finish(COMPLETED, "upstream closed", now)
        elif self.phase == Link.FAILING:
            self.down.hold = False          # Asterisk is gone: nothing more to tell it
        else:
            self.finish(COMPLETED, "client closed", now)

    def header_read(self):
        """Had the application read the whole header when its FIN came?  A close with
        unread bytes is a reset, so a FIN after the kernel acknowledged every header byte
        says yes (Linux's TCP_INFO tells; elsewhere, that it was all written is what we know)."""
        if self.header_size is None or self.up.sent < self.header_size:
            return False
        return TCP_INFO is None or peer_gone(self.session.upstream) is False

    def said_failure(self):
        """Was the application's last line FAILURE?  Then it ended the AGI itself: nothing is in flight."""
        last_line = self.last_chunk.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
        return last_line[:7].lower() == b"failure"

    def lost(self, sock, exc, now):
        """A read or a write on *sock* failed: that peer is gone (reset, timeout, TLS error)."""
        session = self.session
        if self.lingering:
            self.lingering.pop(sock, None)
        why = describe_error(exc)
        if sock is session.client:
            self.up.source_lost()                   # what it sent still goes to the upstream
            self.linger(self.down.sink_lost(), now)
            self.down.hold = False
            self.finish(CLIENTLOST, "client reset (%s)" % why, now)
            return
        if self.down.source is sock:
            self.down.source_lost()                 # what it sent still goes to Asterisk
        if self.phase in (Link.RELAYING, Link.FIN_IN_FLIGHT) and session.end is None:
            after_fin = self.phase == Link.FIN_IN_FLIGHT
            session.upstream_end = session.upstream_end or RESET
            detail = "upstream gone after closing with a command in flight (%s)" % why if after_fin \
                else "upstream reset (%s)" % why
            self.up.sink = None
            del self.up.buffer[:]
            self.upstream_lost(detail, now, not after_fin or session.pool.settings.fin_in_flight == "failure")
        elif self.up.sink is sock:                  # after the application's end: Asterisk finishes alone
            self.linger(self.up.sink_lost(), now)

    def upstream_lost(self, detail, now, failure):
        if self.session.pool.settings.report_lost:
            self.fail(UPSTREAMLOST, detail, now, failure)
        else:                               # agiproxy 1.0: the close goes on to Asterisk
            self.cut(UPSTREAMLOST, detail, now)

    def expired(self, now):
        """A deadline of deadline() has come."""
        session, settings = self.session, self.settings
        for sock, until in list(self.lingering.items() if self.lingering else ()):
            if now >= until:
                del self.lingering[sock]
        if self.phase in (Link.RELAYING, Link.FIN_IN_FLIGHT):
            if self.probe_at is not None and now >= self.probe_at:
                self.probe(now)
            longest, idle = settings.max_session_time, settings.idle_timeout
            if self.phase not in (Link.RELAYING, Link.FIN_IN_FLIGHT):
                return
            if longest and now >= session.started + longest:
                self.timed_out("max_session_time = %gs reached" % longest, now)
            elif idle and now >= self.last + idle:
                self.timed_out("idle_timeout = %gs reached" % idle, now)
        elif self.phase == Link.FAILING and self.failure_step == Link.REPLY:
            if now >= self.since + FAILURE_REPLY_TIMEOUT:
                self.told(now)              # no reply: FAILURE all the same
        elif now >= self.since + settings.fin_timeout:
            session.detail += ", fin_timeout = %gs reached" % settings.fin_timeout
            for pipe in self.pipes:         # what is still open is closed as it is
                pipe.state, pipe.source, pipe.hold = Pipe.SHUT, None, False
            self.lingering = None

    def timed_out(self, detail, now):
        if self.session.pool.settings.report_lost:
            self.fail(TIMEOUT, detail, now)
        else:
            self.cut(TIMEOUT, detail, now)

    # -- ends --------------------------------------------------------------

    def finish(self, reason, detail, now):
        """One side ended: the other direction goes on until its own end (fin_timeout)."""
        session = self.session
        if session.end is None:
            session.end, session.detail = reason, detail
        if self.phase != Link.FAILING:
            self.phase, self.since = Link.ENDING, now
            self.down.hold = False
        self.probe_at = None

    def cut(self, reason, detail, now):
        """End both directions now: what is buffered is written, then both get their FIN."""
        self.finish(reason, detail, now)
        for pipe in self.pipes:
            if pipe.state == Pipe.OPEN:
                self.linger(pipe.source, now)
                pipe.source_lost()

    def linger(self, sock, now):
        """Read *sock* only to reach its end, for at most LINGER_TIMEOUT: a close with unread
        bytes would be a reset, which can destroy what the peer has not yet read."""
        if sock is not None:
            if self.lingering is None:
                self.lingering = {}
            self.lingering[sock] = now + LINGER_TIMEOUT

    def after_io(self, now):
        """FIN_IN_FLIGHT, after the relay read or wrote: start the probe once Asterisk's answer is written."""
        if not self.upstream_spoke_last and not self.up.buffer \
                and self.probe_at is None:
            self.probe_started, self.probe_step = now, FIN_PROBE_STEP
            self.probe_at = now + FIN_PROBE_STEP

    def probe(self, now):
        """FIN_IN_FLIGHT, Asterisk's answer written: is the application still there?"""
        gone = peer_gone(self.session.upstream)
        if gone:
            self.upstream_lost("upstream gone after closing with a command in flight", now,
                               self.session.pool.settings.fin_in_flight == "failure")
        elif gone is False or now - self.probe_started >= FIN_PROBE_LIMIT:
            self.finish(COMPLETED, "upstream closed", now)      # a half-close: it reads on
        else:
            self.probe_step *= 2
            self.probe_at = now + self.probe_step

    # -- the failure path --------------------------------------------------

    def fail(self, reason, detail, now, failure=True):
        """Tell Asterisk why: SET VARIABLE <failure_variable> <reason>, then FAILURE (or, with
        *failure* False, end there: AGISTATUS stays SUCCESS).  Bytes the application had
        sent are delivered first; a live upstream gets its FIN and is read to its end."""
        session = self.session
        session.end, session.detail = reason, detail
        session.proxy.count_failure(reason)
        log.warning("%s: %s %s: %s", session.client_name, reason, printable(session.request_url), detail)
        upstream = session.upstream
        if upstream is not None and self.up.sink is upstream:
            shut_write(upstream)
        self.up.sink = None             # what Asterisk says now is for agiproxy
        del self.up.buffer[:]
        if self.down.source is not None:
            self.linger(self.down.source, now)
        self.down.source_lost()
        self.phase, self.down.hold = Link.FAILING, True
        self.failure_final = b"FAILURE\n" if failure else b""
        if self.upstream_spoke_last:
            self.failure_step = Link.ANSWER     # never pipeline: Asterisk reads one line at a time
        else:
            self.tell(now)

    def tell(self, now):
        self.failure_step, self.since = Link.REPLY, now
        self.down.buffer += encode("SET VARIABLE %s %s\n" % (self.settings.failure_variable, self.session.end))

    def told(self, now):
        self.failure_step, self.since = Link.TOLD, now
        self.down.buffer += self.failure_final
        self.down.hold = False

    def failure_input(self, data, answer, now):
        """What Asterisk says while agiproxy talks to it."""
        if self.failure_step == Link.ANSWER:
            if answer:
                self.upstream_spoke_last = False
                self.tell(now)
        elif self.failure_step == Link.REPLY:
            self.reply += data
            lines = bytes(self.reply).split(b"\n")[:-1]      # HANGUP lines may come first
            if any(line[:1].isdigit() for line in lines) or len(self.reply) > 4096:
                self.told(now)


class Relay(object):
    """The relay loop: one thread, one selector, every session.

    It accepts on the plain listeners, opens inline what needs no waiting
    (Session's steps), hands the rest to worker threads, and copies the
    bytes of every session through its two Pipes.  One thread keeps
    Python's GIL from changing hands at every AGI command, and an idle call
    costs two sockets and a few hundred bytes, not a thread.

    Nothing here blocks: reads and writes are non-blocking, logging goes to
    a queue, the proxy's lock is held only to count.  Bytes are never
    parsed: HANGUP lines and 520 usage blocks pass as they are.  Other
    threads reach the loop through call().  Deadlines sit in a heap.
    """

    def __init__(self, proxy):
        self.proxy = proxy
        self.selector = selectors.DefaultSelector()     # epoll: one descriptor for the whole proxy
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_read.setblocking(False)
        self.wake_write.setblocking(False)
        self.selector.register(self.wake_read, READ)
        self.lock = threading.Lock()
        self.incoming = []          # (function, args) to run in the loop
        self.woken = False
        self.timers = []            # heap of (when, sequence, link)
        self.live = 0               # sessions in the loop now
        self.links = set()
        self.paused = {}            # listener -> when accepting resumes (out of descriptors)
        self.closing = {}           # listener -> (when it closes, event to set)
        self.sequence = itertools.count()
        self.stopping = False
        self.thread = None

    def start(self):
        # made here, not in __init__: --daemon forks in between, and Python 3.13
        # refuses to start a Thread object created before a fork
        self.thread = threading.Thread(target=self.run, name="relay", daemon=True)
        self.thread.start()

    def stop(self):
        """End the loop; sessions still in it are closed as ABORTED."""
        self.call(self._stop)
        if self.thread is not None:
            self.thread.join(5)

    def call(self, function, *args):
        """Run ``function(*args)`` in the loop's thread; False when the loop has stopped."""
        with self.lock:
            if self.stopping:
                return False
            self.incoming.append((function, args))
            wake, self.woken = not self.woken, True
        if wake:
            try:
                self.wake_write.send(b"\0")
            except OSError:
                pass    # a wake-up is already waiting (buffer full), or we are closing
        return True

    def add(self, session, failure):
        """Take over a session a worker has opened (or failed to open): see open()."""
        if not self.call(self.open, session, failure):
            close_quietly(session.upstream)
            close_quietly(session.client)
            session.end, session.detail = ABORTED, session.abort_reason or "shutdown"
            session.closed = True
            self.proxy.session_ended(session)

    def listen(self, listener):
        """Accept on *listener* in the loop."""
        self.call(self._listen, listener)

    def unlisten(self, listener):
        """Stop accepting on *listener* without resetting any connection the kernel has
        completed; return an Event set once it is closed."""
        done = threading.Event()
        if not self.call(self._unlisten, listener, done):
            listener.server_close()
            done.set()
        return done

    def owns(self, session):
        """Is *session* in the loop now?  (For the rare path of an internal error.)"""
        return any(link.session is session for link in self.links)

    # -- the loop ----------------------------------------------------------

    def run(self):
        while not self.stopping:
            try:
                self._turn()
            except Exception:   # a bug must cost one session, never the loop
                log.exception("relay loop: internal error")
        for function, args in self.incoming:    # what other threads handed over meanwhile
            if function == self.open:
                args[0].abort_reason = args[0].abort_reason or "shutdown"
                self.open(*args)
            elif function == self._unlisten:
                args[0].server_close()
                args[1].set()
        for listener, (_, done) in list(self.closing.items()):
            listener.server_close()
            done.set()
        for link in list(self.links):
            link.session.end, link.session.detail = ABORTED, link.session.abort_reason or "shutdown"
            self._close(link)
        self.selector.close()
        self.wake_read.close()
        self.wake_write.close()

    def _stop(self):
        with self.lock:
            self.stopping = True

    def _turn(self):
        times = ([self.timers[0][0]] if self.timers else []) + list(self.paused.values()) + \
            [when for when, _ in self.closing.values()]
        timeout = max(0.0, min(times) - time.monotonic()) if times else None
        for key, mask in self.selector.select(timeout):
            data = key.data
            if data is None:
                self._take_incoming()
            elif isinstance(data, Link):
                link = data
                if link in self.links:
                    try:
                        self._event(link, key.fileobj, mask)
                    except Exception:
                        log.exception("%s: relay: internal error", link.session.client_name)
                        link.session.end, link.session.detail = INTERNAL, "internal error"
                        self._close(link)
            else:
                self._accept(data)
        now = time.monotonic()
        if self.timers and self.timers[0][0] <= now:
            self._expire(now)
        for listener, when in list(self.paused.items()):
            if when <= now:
                del self.paused[listener]
                self.selector.register(listener.socket, READ, listener)
        for listener, (when, done) in list(self.closing.items()):
            if when <= now:
                self._accept(listener)          # the last ones the kernel completed
                del self.closing[listener]
                self._unwatch(listener)
                listener.server_close()
                done.set()

    def _take_incoming(self):
        try:
            while self.wake_read.recv(4096):
                pass
        except OSError:
            pass
        with self.lock:
            incoming, self.incoming, self.woken = self.incoming, [], False
        for function, args in incoming:
            function(*args)

    # -- listeners ---------------------------------------------------------

    def _listen(self, listener):
        listener.socket.setblocking(False)
        self.selector.register(listener.socket, READ, listener)

    def _unwatch(self, listener):
        self.paused.pop(listener, None)
        try:
            self.selector.unregister(listener.socket)
        except (KeyError, ValueError):
            pass

    def _unlisten(self, listener, done):
        # New SYNs are dropped from now on (they are refused once the socket is closed);
        # handshakes already under way still complete, and are accepted and served.
        refuse_new_connections(listener.socket)
        self.closing[listener] = (time.monotonic() + DRAIN_ACCEPT_GRACE, done)

    def _accept(self, listener):
        """socketserver's request handling, without blocking: accept what is there."""
        for _ in range(ACCEPT_BATCH):
            try:
                request, client_address = listener.get_request()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in LOCAL_SHORTAGE:     # pause instead of spinning on the ready listener
                    listener.accept_pause = min(max(listener.accept_pause * 2, 0.01), 1.0)
                    self.proxy.limited_log("accept", logging.ERROR, "%s: cannot accept: %s; pausing accepts "
                                           "for %gs", listener.name, describe_error(exc), listener.accept_pause)
                    self._unwatch(listener)
                    if listener not in self.closing:
                        self.paused[listener] = time.monotonic() + listener.accept_pause
                return
            listener.accept_pause = 0.0
            if listener.verify_request(request, client_address):
                listener.process_request(request, client_address)
            else:
                listener.shutdown_request(request)

    # -- opening sessions --------------------------------------------------

    def open_inline(self, session):
        """A plain connection just accepted: open it here if its header arrives at once
        (within HEADER_GRACE); else a worker waits for the rest."""
        session.client.setblocking(False)
        self._header_input(session, None)

    def _header_input(self, session, link):
        """Read what the client sent of its header; once it is whole, choose and connect.
        *link* is the session's HEADER link once it waits in the loop."""
        try:
            session.scanner.feed(session.client.recv(8192))
            if session.scanner.done:
                session.header, session.leftover = session.scanner.result()
        except WOULD_BLOCK:
            pass
        except (HeaderError, OSError, ValueError) as exc:
            if link is not None:
                self._forget(link)
            return self.open(session, (BADHEADER, describe_header_error(exc)))
        if session.header is None:
            if link is None:
                self._track(Link(session, Link.HEADER))
            return
        if link is not None:
            self._forget(link)
        failure = session.take_header()
        if failure:
            return self.open(session, failure)
        self._connect_next(session)

    def _connect_next(self, session):
        """Reserve and connect without blocking; a server that needs waiting goes to a worker."""
        while True:
            if session.member is None:
                failure = session.reserve()
                if failure and failure[0] == QUEUE:     # waiting is for a worker, never the relay
                    return self.proxy.workers.submit(session)
                if failure:
                    return self.open(session, failure)
            if not session.connects_inline():
                return self.proxy.workers.submit(session)
            state = session.member.state
            try:
                if session.attempt_timeout <= 0:
                    raise socket.timeout("connect_budget spent")
                session.upstream = begin_connect(state.host, state.port)
            except OSError as exc:
                failure = session.connect_failed(exc)
                if failure:
                    return self.open(session, failure)
                continue
            return self._track(Link(session, Link.CONNECTING))

    def _connected(self, link):
        """The inline connect completed, one way or the other."""
        session = link.session
        error = session.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not error:
            tune_socket(session.upstream, session.settings, upstream=True)
            return self._relay(link)
        self._forget(link)
        close_quietly(session.upstream)
        session.upstream = None
        failure = session.connect_failed(OSError(error, os.strerror(error)))
        if failure:
            return self.open(session, failure)
        self._connect_next(session)

    def open(self, session, failure):
        """Start relaying a connected session, or its failure path; close a bad header."""
        if session.abort_reason is not None:
            failure = ABORTED, session.abort_reason
        if failure is None:
            return self._track(Link(session, Link.RELAYING))
        reason, detail = failure
        if reason in (BADHEADER, ABORTED, INTERNAL, CLIENTLOST):    # not a FastAGI client, no time left, or gone
            session.end, session.detail = reason, detail
            if reason == BADHEADER:
                self.proxy.count_failure(BADHEADER)
                log.warning("%s: %s; closing", session.client_name, detail)
            close_quietly(session.client)
            session.closed = True
            return self.proxy.session_ended(session)
        link = Link(session, Link.RELAYING)
        self.live += 1
        self.links.add(link)
        link.fail(reason, detail, time.monotonic())
        self._after(link)

    def _track(self, link):
        self.live += 1
        self.links.add(link)
        if link.phase == Link.RELAYING:
            return self._relay(link)
        self._after(link)

    def _relay(self, link):
        """The upstream is connected: send it the header and what followed, then relay."""
        session = link.session
        link.phase = Link.RELAYING
        link.up.sink = link.down.source = session.upstream
        forwarded = session.forwarded()
        link.header_size = len(forwarded) - len(session.leftover)
        session.release_header()
        link.up.buffer += forwarded
        session.bytes_up += len(forwarded)           # bytes_up counts the forwarded header too
        self._flush(link, link.up, time.monotonic())
        self._after(link)

    # -- relaying ----------------------------------------------------------

    def _event(self, link, sock, mask):
        now = time.monotonic()
        session = link.session
        if session.abort_reason is not None:
            session.end, session.detail = ABORTED, session.abort_reason
            return self._close(link)
        if link.phase == Link.HEADER:
            return self._header_input(session, link)
        if link.phase == Link.CONNECTING:
            return self._connected(link)
        # the pipe *sock* feeds, and the one that writes to it
        inbound, outbound = (link.up, link.down) if sock is session.client else (link.down, link.up)
        if mask == READ and link.phase == Link.RELAYING and not (outbound.buffer or inbound.buffer):
            # the common event, a line from either side, without the bookkeeping of the rest
            if self._receive(link, inbound, now):
                self._flush(link, inbound, now)
                if not inbound.buffer and link.phase == Link.RELAYING:
                    return          # all written: both sockets still want READ only
        else:
            if outbound.sink is sock and mask & outbound.write_on:     # writes first: they make room
                self._flush(link, outbound, now)
            if mask & READ and link.lingering and sock in link.lingering:
                self._discard(link, sock)
            if inbound.source is sock and mask & inbound.read_on and inbound.readable():
                self._receive(link, inbound, now)
        for pipe in link.pipes:
            if pipe.buffer or pipe.state == Pipe.EOF and not pipe.hold:
                self._flush(link, pipe, now)
        self._after(link)

    @staticmethod
    def _receive(link, pipe, now):
        """Read *pipe*'s source and tell the link what came: bytes, an EOF, or a failure."""
        try:
            data = pipe.receive()
        except OSError as exc:
            link.lost(pipe.source, exc, now)
            return None
        if data:
            link.received(pipe, data, now)
        elif data is not None:
            link.source_ended(pipe, now)
        return data

    @staticmethod
    def _flush(link, pipe, now):
        try:
            pipe.flush()
        except OSError as exc:
            link.lost(pipe.sink, exc, now)

    @staticmethod
    def _discard(link, sock):
        """Read a lingering socket to its end, so that closing it resets nothing."""
        try:
            while sock.recv(RELAY_CHUNK):
                pass
        except WOULD_BLOCK:
            return
        except OSError:
            pass
        del link.lingering[sock]

    def _after(self, link):
        """After any change: close a finished link, else watch what it needs and schedule it."""
        if link.phase == Link.FIN_IN_FLIGHT:
            link.after_io(time.monotonic())
        if link.finished():
            return self._close(link)
        session, interest = link.session, link.interest
        for index in (0, 1):
            sock = session.upstream if index else session.client
            if sock is None:
                continue
            want, have = link.events_for(sock), interest[index]
            if want != have:
                if not have:
                    self.selector.register(sock, want, link)
                elif want:
                    self.selector.modify(sock, want, link)
                else:
                    self.selector.unregister(sock)
                interest[index] = want
        when = link.deadline()
        if when is not None and (link.scheduled is None or when < link.scheduled):
            link.scheduled = when
            heapq.heappush(self.timers, (when, next(self.sequence), link))

    def _expire(self, now):
        while self.timers and self.timers[0][0] <= now:
            link = heapq.heappop(self.timers)[2]
            if link not in self.links:
                continue
            link.scheduled = None
            when = link.deadline()
            if when is not None and when <= now:
                if link.phase == Link.HEADER:       # a slow client: a worker waits for it
                    self._forget(link)
                    self.proxy.workers.submit(link.session)
                    continue
                if link.phase == Link.CONNECTING:
                    self._forget(link)
                    close_quietly(link.session.upstream)
                    link.session.upstream = None
                    failure = link.session.connect_failed(socket.timeout("timed out"))
                    if failure:
                        self.open(link.session, failure)
                    else:
                        self._connect_next(link.session)
                    continue
                link.expired(now)
                for pipe in link.pipes:
                    if pipe.buffer or pipe.state == Pipe.EOF and not pipe.hold:
                        self._flush(link, pipe, now)
            self._after(link)

    def _forget(self, link):
        """Stop watching *link*'s sockets and drop it (its session goes on, or is closed)."""
        for sock, events in zip((link.session.client, link.session.upstream), link.interest):
            if events:
                try:
                    self.selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
        link.interest = [0, 0]
        self.links.discard(link)
        self.live -= 1
        if len(self.timers) > 2 * self.live + 64:     # entries of ended sessions: drop them
            self.timers = [entry for entry in self.timers if entry[2] in self.links]
            heapq.heapify(self.timers)

    def _close(self, link):
        session = link.session
        self._forget(link)
        close_quietly(session.upstream)
        close_quietly(session.client)
        session.closed = True
        self.proxy.session_ended(session)


###############################################################################
# The proxy: shared state, listeners, workers and metrics #####################
###############################################################################


class AgiHandler(socketserver.BaseRequestHandler):
    """socketserver's handler, for the waiting path: a worker thread finishes
    opening the session (``request`` is the Session) and hands it to the relay."""

    def handle(self):
        self.request.open_blocking()


class AgiListener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A listening address.  The relay accepts on it (get_request, verify_request,
    process_request, as socketserver's own loop would); a session that must wait
    goes to the proxy's warm workers (process_request_thread)."""

    allow_reuse_address = True

    def __init__(self, proxy, address, tls, backlog):
        self.proxy = proxy
        self.tls = tls
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.request_queue_size = backlog
        self.accept_pause = 0.0
        self.tuned = None           # the settings the listening socket's TCP options are from
        socketserver.TCPServer.__init__(self, address, AgiHandler)

    @property
    def name(self):
        return ("tls " if self.tls else "") + format_address(*self.server_address[:2])

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)

    def verify_request(self, request, client_address):
        return self.proxy.admit(client_address, self.tls)

    def process_request(self, request, client_address):
        """In the relay thread: open the session inline, or give it to a worker."""
        proxy = self.proxy
        if not OPTIONS_INHERITED or self.tuned is not proxy.settings:
            tune_socket(request, proxy.settings)
            if OPTIONS_INHERITED:       # once per configuration: the next ones inherit it
                tune_socket(self.socket, proxy.settings)
                self.tuned = proxy.settings
        session = Session(proxy, request, client_address, self)
        proxy.session_started(session)
        try:
            if self.tls:
                proxy.workers.submit(session)
            else:
                proxy.relay.open_inline(session)
        except Exception:       # a bug must cost this session only, and still end it
            log.exception("%s: internal error", session.client_name)
            if not session.closed and not proxy.relay.owns(session):
                proxy.relay.open(session, (INTERNAL, "internal error"))

    def process_request_thread(self, session, client_address):
        """ThreadingMixIn's, without closing the socket: the relay closes it."""
        self.finish_request(session, client_address)


class WorkerPool(object):
    """Warm threads for the waiting path: a session reuses an idle thread instead of starting one.

    Threads are started on demand, so there is no cap but the process's; at
    most *spare* idle threads are kept waiting for work.  A session that
    cannot get a thread is closed (and counted) at once.
    """

    def __init__(self, proxy, spare):
        self.proxy = proxy
        self.spare = spare
        self.lock = threading.Lock()
        self.idle = 0
        self.jobs = queue.Queue()

    def submit(self, session):
        """Run the session's listener's handler for it (see AgiListener.process_request_thread)."""
        with self.lock:
            reuse = self.idle > 0
            if reuse:
                self.idle -= 1
        if reuse:
            self.jobs.put(session)
            return
        try:
            threading.Thread(target=self._work, args=(session,), daemon=True).start()
        except RuntimeError as exc:     # can't start new thread
            self.proxy.limited_log("thread", logging.ERROR, "%s: cannot serve: %s", session.client_name, exc)
            self.proxy.relay.open(session, (ABORTED, "no thread: %s" % exc))

    def _work(self, session):
        while session is not None:
            session.listener.process_request_thread(session, session.client_address)
            with self.lock:
                if self.idle >= self.spare:
                    return
                self.idle += 1
            session = self.jobs.get()

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
        self.durations = Histogram(DURATION_BUCKETS)
        self.reloads = 0
        self.reload_ok = 1

    def observe(self, duration, bytes_up, bytes_down):
        self.sessions += 1
        self.bytes_up += bytes_up
        self.bytes_down += bytes_down
        self.durations.observe(duration)


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
        self.active = 0         # sessions holding a server slot (connecting or relaying)
        self.max_connections = connection_limit(config.settings)     # of the others
        self.stats = Stats()
        self.listeners = collections.OrderedDict()   # (tls, host, port) as configured -> AgiListener
        self.console = Console(self)       # stats_listen and control_socket
        self.checkers = []
        self.workers = WorkerPool(self, config.settings.spare_threads)
        self.relay = Relay(self)
        self.log_windows = {}
        self.draining = False
        self.daemon = False
        self.wakeup_fd = None
        self.started, self.started_at = time.monotonic(), time.time()
        self.open_files = 0     # the open-file limit, once main() has raised it

    # -- life cycle --------------------------------------------------------

    def bind(self):
        """Open every listening socket; raise OSError naming the address that failed."""
        self.listeners = self._open_listeners(self.settings, {})
        try:
            if self.settings.stats_listen:
                self.console.add(self._open(lambda: StatsEndpoint(self, self.settings.stats_listen[0]),
                                            "stats_listen", self.settings.stats_listen[0]))
            if self.settings.control_socket:
                self.console.add(ControlEndpoint(self, self.settings.control_socket, self.settings.control_group))
        except OSError:
            for listener in self.listeners.values():
                listener.server_close()
            self.console.stop()
            raise

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
            self.relay.listen(listener)
        self.console.start()
        self._start_checkers()
        for listener in self.listeners.values():
            log.info("listening on %s", listener.name)

    def _start_checkers(self):
        """Start the background threads of the pools: health checks, agent checks, DNS discovery."""
        pools = self.upstreams.pools.values()
        self.checkers = [HealthChecker(self, pool) for pool in pools if pool.settings.check != "none"] + \
            [AgentChecker(self, pool) for pool in pools
             if pool.settings.agent_port or any(line.agent_port for line in pool.lines + pool.named)] + \
            [Discoverer(self, pool) for pool in pools if pool.lines]
        for checker in self.checkers:
            checker.start()

    def _stop_checkers(self, wait=False):
        """Stop the health checks; a check under way ends on its own and is not applied.
        *wait* (at shutdown) joins them; a reload does not, so signals are not held up."""
        for checker in self.checkers:
            checker.stop()
        for checker in self.checkers if wait else ():
            if not isinstance(checker, Discoverer):     # a lookup in flight ends on its own; its answer is dropped
                checker.join(checker.pool.settings.check_timeout * 2 + 1)
        self.checkers = []

    @property
    def addresses(self):
        """The bound addresses as ``(tls, host, port)``, with real port numbers."""
        return [(l.tls,) + tuple(l.server_address[:2]) for l in self.listeners.values()]

    def stop_listening(self, listeners=None):
        """Stop accepting on *listeners* (default: all) and close them, resetting no
        connection the kernel has completed (a drain's first step)."""
        if listeners is None:
            listeners, self.listeners = list(self.listeners.values()), collections.OrderedDict()
        for done in [self.relay.unlisten(listener) for listener in listeners]:
            done.wait(DRAIN_ACCEPT_GRACE + 5)

    def shutdown(self):
        """Stop everything: listeners, checks, stats endpoint and control socket, live sessions and idle workers."""
        self.stop_listening()
        self._stop_checkers(wait=True)
        self.console.stop()
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
        needs_restart = [key for key in ("stats_listen", "spare_threads", "backlog", "control_socket", "control_group")
                         if getattr(config.settings, key) != getattr(self.settings, key)]
        if needs_restart:
            log.warning("%s changed: restart agiproxy to apply (backlog applies to new listeners now)",
                        ", ".join(needs_restart))
        with self.lock:
            self.config, self.settings, self.upstreams = config, config.settings, upstreams
            self.max_connections = connection_limit(config.settings)
            self.server_context = server_context
            self.listeners = listeners
            self.stats.reloads += 1
            self.stats.reload_ok = 1
        self._stop_checkers()
        self._start_checkers()
        self.stop_listening(removed)
        for listener in removed:
            log.info("stopped listening on %s", listener.name)
        for listener in added:
            self.relay.listen(listener)
            log.info("listening on %s", listener.name)
        log.info("configuration reloaded from %s: %d routes, %d pools", path, len(config.routes), len(config.pools))
        return True

    # -- sessions ----------------------------------------------------------

    def session_started(self, session):
        with self.lock:
            self.sessions.add(session)
            self.stats.connections += 1

    def session_ended(self, session):
        """Give back the session's slot, judge the server by it, count it and write its access-log line."""
        now = time.monotonic()
        duration = now - session.started
        hook, said = None, []
        with self.lock:
            self.sessions.discard(session)
            member, pool = session.member, session.pool
            if member is not None:
                state = member.state
                state.sessions += 1
                state.ends[session.end] += 1
                state.bytes_up += session.bytes_up
                state.bytes_down += session.bytes_down
                pool.state.sessions += 1
                self.stats.observe(duration, session.bytes_up, session.bytes_down)
                verdict = state.judge_session(session.bytes_down > 0, session.header_read, session.upstream_end,
                                              session.trial, pool.settings.early_close_limit)
                if verdict is True and session.trial:
                    said += self._mark_up(pool, member, "its trial session worked")
                elif verdict not in (None, True):
                    said += self._mark_down(pool, member, verdict, now, session.trial)
                elif session.trial:
                    state.trial = False     # the trial said nothing of the server: the next session tries
                hook = self._give_back(pool, member, now)
            drained = self.draining and not self.sessions
        self._say(said)
        self._run_hook(pool, hook)
        if session.settings.access_log and log.isEnabledFor(logging.INFO):
            log.info('session client=%s request="%s" route=%s pool=%s server=%s duration=%.3f '
                     'bytes_up=%d bytes_down=%d end=%s why="%s"', session.client_name,
                     printable(session.request_url), session.route.name if session.route else "-",
                     session.pool.name if session.pool else "-", member.name if member else "-", duration,
                     session.bytes_up, session.bytes_down, session.end, printable(session.detail))
        if drained and self.wakeup_fd is not None:     # last: the line above is queued before we exit
            try:
                os.write(self.wakeup_fd, b"\x00")
            except OSError:
                pass

    def decide(self, request, header, client_host):
        """Return ``(route, pool, order, upstream_path, upstream_query)``; route is None for no route.

        The regexes run outside the lock (they are the caller's to make slow); only the
        pool's order, which moves its rotation and reads live counts, takes it."""
        upstreams = self.upstreams      # one configuration for the whole decision, whatever a reload does
        route, pool, path, query = upstreams.route(request, header)
        skipped = upstreams.router.too_long(request, header.variables)
        if skipped:
            self.limited_log("match_length", logging.WARNING, "%s: %s longer than max_match_length = %d: "
                             "no regex condition matches it", client_host, ", ".join(skipped),
                             upstreams.router.limit)
        if route is None:
            return None, None, [], path, query
        with self.lock:
            order = pool.order(header.variables, client_host)
        return route, pool, order, path, query

    def reserve(self, pool, order, tried, waiter=None):
        """Reserve a slot on the next server of *order*; see Pool.reserve().

        When no server has a slot (every one at max=, or max_sessions reached)
        and the pool has a queue_timeout, the answer is ``(None, QUEUE)``, unless
        *waiter* (a Session in a worker thread) is given: it then waits in
        arrival order for a slot, up to queue_timeout, and gets ``(None, BUSY)``
        if none comes in time, ``(None, CLIENTLOST)`` if Asterisk hangs up
        meanwhile.  With max_queue sessions waiting the answer is BUSY at once.
        Sessions queued first are served first: while the queue is not empty
        nobody else takes a slot of the pool."""
        settings, state = pool.settings, pool.state
        hook = None
        with self.lock:
            queueing = settings.queue_timeout and not tried
            if queueing and state.queue:
                member, reason = None, BUSY
            else:
                member, reason, hook = self._reserve(pool, order, tried)
            room = not settings.max_queue or len(state.queue) < settings.max_queue
            if member is None and reason == BUSY and queueing and room:
                if waiter is None:
                    reason = QUEUE
                else:
                    waiter.ticket = QueueTicket()
                    state.queue.append(waiter.ticket)
        if waiter is not None and waiter.ticket is not None:
            member, reason, hook = self._wait_in_queue(pool, order, tried, waiter)
        self._run_hook(pool, hook)
        return member, reason

    def _reserve(self, pool, order, tried):
        """With the lock held: ``(member, reason, hook)``, see Pool.reserve()."""
        if self.settings.max_sessions and self.active >= self.settings.max_sessions:
            return None, BUSY, None
        now = time.monotonic()
        member, reason = pool.reserve(order, tried, now)
        if member is None:
            return None, reason, None
        self.active += 1
        return member, reason, pool.saturation_change(now)

    def _wait_in_queue(self, pool, order, tried, session):
        """Wait for *session*'s turn and a slot, up to the pool's queue_timeout."""
        state, ticket = pool.state, session.ticket
        started = time.monotonic()
        deadline = started + pool.settings.queue_timeout
        member, reason, hook = None, BUSY, None
        while session.abort_reason is None and member is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if session.caller_gone():      # its place goes to the next caller
                reason = CLIENTLOST
                break
            ticket.ready.wait(min(remaining, QUEUE_POLL))
            with self.lock:
                ticket.ready.clear()
                if state.queue and state.queue[0] is ticket and session.abort_reason is None:
                    member, reason, hook = self._reserve(pool, order, tried)
        with self.lock:
            if member is None:
                state.queue_timeouts += session.abort_reason is None and reason == BUSY
            state.queued.observe(time.monotonic() - started)
            head = state.queue and state.queue[0] is ticket
            state.queue.remove(ticket)
            if state.queue and (head or member is not None):
                state.queue[0].ready.set()      # the next one may find a slot too
        if member is None:
            session.ticket = None
        return member, reason, hook

    def _wake_queues(self):
        """With the lock held: a slot may be free now; the first session queued in each pool looks."""
        for pool in self.upstreams.pools.values():
            if pool.state.queue:
                pool.state.queue[0].ready.set()

    def connect_failed(self, pool, member, why, trial, judged=True, shortage=False):
        """Give back the slot of a failed connect; *judged*: the failure counts against the
        server; *shortage*: agiproxy's own, not even counted as the server's connect failure."""
        now = time.monotonic()
        said = []
        with self.lock:
            if not shortage:
                member.state.connect_failures += 1
            if judged:
                said = self._mark_down(pool, member, "connect failed: " + why, now, trial)
            elif trial:
                member.state.trial = False
            hook = self._give_back(pool, member, now)
        self._say(said)
        self._run_hook(pool, hook)

    def _give_back(self, pool, member, now):
        """With the lock held: free *member*'s slot; return the pool hook now due, if any."""
        member.state.active -= 1
        self.active -= 1
        self._wake_queues()
        return pool.saturation_change(now)

    @staticmethod
    def _run_hook(pool, hook):
        if hook:
            pool.state.hooks.submit(hook, pool.settings.hook_timeout)

    def trial_passed(self, pool, member):
        """The half-open try got its first byte from the server: it is back."""
        with self.lock:
            said = self._mark_up(pool, member, "it answered its trial session")
        self._say(said)

    def check_result(self, pool, member, why):
        """Apply one active check result with HAProxy's rise/fall counting."""
        settings = pool.settings
        said = []
        with self.lock:
            state = member.state
            state.last_check = (time.time(), why)
            if why is None:
                state.check_streak = max(state.check_streak, 0) + 1
                if not state.up and state.check_streak >= settings.rise:
                    said = self._mark_up(pool, member, "%d checks passed" % settings.rise)
            elif isinstance(why, CheckSkipped):
                said = [(logging.DEBUG, "check of %s in pool %s skipped: %s (agiproxy is short of it, not the server)",
                         (member.name, pool.name, why))]
            else:
                state.check_streak = min(state.check_streak, 0) - 1
                said = [(logging.DEBUG, "check of %s in pool %s failed: %s", (member.name, pool.name, why))]
                if state.up and -state.check_streak >= settings.fall:
                    said += self._mark_down(pool, member, "%d checks failed, last: %s" % (settings.fall, why),
                                            time.monotonic())
        self._say(said)

    def discovered(self, pool, line, entries, error):
        """What DNS says of *line* of *pool* now; *entries* None: the lookup failed (*error*)
        and the pool keeps the servers of the last good one (logged once per outage)."""
        said = []
        with self.lock:
            if self.upstreams.pools.get(pool.name) is not pool:
                return          # replaced by a reload meanwhile
            state, name = pool.state, "%s %s" % (line.discover, line.host)
            if entries is None:
                if line not in state.lookup_failing:
                    state.lookup_failing.add(line)
                    said.append((logging.WARNING, "pool %s: lookup of %s failed, keeping its %d servers: %s",
                                 (pool.name, name, len(pool.found[line]), error)))
            else:
                if line in state.lookup_failing:
                    state.lookup_failing.discard(line)
                    said.append((logging.WARNING, "pool %s: lookup of %s works again", (pool.name, name)))
                joined, left = pool.set_discovered(line, entries, self.upstreams.states, time.monotonic(),
                                                   joining=line in state.discovered)
                if joined or left:
                    self.upstreams.forget_unused()
                    self._wake_queues()
                said += [(logging.INFO, "pool %s: server %s joins (from %s)", (pool.name, server, name))
                         for server in joined]
                said += [(logging.INFO, "pool %s: server %s leaves (gone from %s); its live sessions go on",
                          (pool.name, server, name)) for server in left]
        self._say(said)

    def agent_said(self, pool, member, line):
        """Apply the answer *line* of *member*'s agent; a malformed one is logged and ignored."""
        state = member.state
        try:
            report = parse_agent_line(line, state.agent)
        except ValueError as exc:
            self.limited_log("agent", logging.WARNING, "agent of %s in pool %s said \"%s\": %s; ignored",
                             member.name, pool.name, printable(line, 80), exc)
            return
        said = []
        with self.lock:
            before, state.agent = state.agent, report
            if report != before:
                if before.state != AGENT_UP and report.state == AGENT_UP:
                    state.up_since = time.monotonic()      # back from drain, maint or down: slow start
                self._wake_queues()
                said.append((logging.INFO, "agent of %s in pool %s: %s, weight %d%%, maxconn %s",
                             (member.name, pool.name, report.state, report.weight * 100, report.maxconn or "-")))
        self._say(said)

    def _mark_up(self, pool, member, why):
        """With the lock held: put *member* back in service; return what to log once the lock is released."""
        if member.state.mark_up():
            self._wake_queues()
            return [(logging.WARNING, "server %s of pool %s is up again: %s", (member.name, pool.name, why))]
        return []

    @staticmethod
    def _mark_down(pool, member, why, now, trial=False):
        """With the lock held: take *member* out of service; return what to log once the lock is released."""
        settings = pool.settings
        state = member.state
        said = []
        if state.mark_down(now, why, settings.retry_after, settings.retry_after_max, trial):
            said.append((logging.WARNING, "server %s of pool %s is down: %s", (member.name, pool.name, why)))
        elif trial:
            said.append((logging.INFO, "server %s of pool %s still down, next try in %gs: %s",
                         (member.name, pool.name, state.backoff, why)))
        if settings.check != "none":
            state.check_streak = min(state.check_streak, 0)
        return said

    @staticmethod
    def _say(said):
        """Log what was collected under the lock: the log never runs while the lock is held."""
        for level, message, args in said:
            log.log(level, message, *args)

    def count_failure(self, reason):
        with self.lock:
            self.stats.failures[reason] += 1

    def admit(self, client_address, tls):
        """The listener ACL and max_connections: False (and a rate-limited log line) for a
        client to close at once."""
        settings, limit = self.settings, self.max_connections
        with self.lock:
            waiting = len(self.sessions) - self.active
            if waiting >= limit:
                self.stats.failures[REFUSED] += 1
        if waiting >= limit:
            self.limited_log("max_connections", logging.WARNING, "%s: %d connections wait for a header or a server "
                             "(max_connections = %d); closed", client_address[0], waiting, limit)
            return False
        allow, deny = (settings.tls_allow or settings.allow, settings.tls_deny or settings.deny) if tls \
            else (settings.allow, settings.deny)
        if not allow and not deny or network_allowed(client_address[0], allow, deny):
            return True
        self.count_failure(DENIED)
        self.limited_log("deny", logging.WARNING, "%s: denied by %sallow/deny; closed",
                         client_address[0], "tls_" if tls else "")
        return False

    def abort_sessions(self, reason):
        with self.lock:
            sessions = list(self.sessions)
        for session in sessions:
            member = session.member         # read once: a worker may be giving it back
            log.warning("%s: closing session %s on %s: %s", session.client_name, printable(session.request_url),
                        member.name if member else "-", reason)
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
        said = []
        with self.lock:
            start, shown, dropped = self.log_windows.get(key, (now, 0, 0))
            if now - start >= 10:
                if dropped:
                    said.append((level, "%d similar messages not logged in the last %.0fs", (dropped, now - start)))
                start, shown, dropped = now, 0, 0
            if shown < 10:
                shown += 1
                said.append((level, message, args))
            else:
                dropped += 1
            self.log_windows[key] = (start, shown, dropped)
        self._say(said)

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
                lines.append("pool %s (%s): %d active, %d sessions, %d queued now, %d queue timeouts" % (
                    pool.name, pool.mode, pool.active, pool.state.sessions, len(pool.state.queue),
                    pool.state.queue_timeouts))
                now = time.monotonic()
                for member in pool.members:
                    state = member.state
                    lines.append("  server %s%s: %s%s, %d/%s active, %d sessions, %d connect failures%s%s%s" % (
                        member.name, " backup" if member.backup else "", "up" if state.up else "DOWN",
                        "" if member.admin == READY else " (%s)" % member.admin,
                        state.active, member.limit(now, pool.settings.slowstart) or "-", state.sessions,
                        state.connect_failures, " (%s)" % state.why_down if state.why_down else "",
                        "" if state.agent == AgentReport() else ", agent: %s %d%%" % (state.agent.state,
                                                                                      state.agent.weight * 100),
                        ", slow start %d%%" % (member.ramp(now, pool.settings.slowstart) * 100)
                        if member.ramp(now, pool.settings.slowstart) < 1 else ""))
        return lines

    def status(self):
        """Everything the status page, /status.json and ``show servers``/``show info`` show, as plain data."""
        now = time.time()
        with self.lock:
            stats = self.stats
            pools = []
            for pool in self.upstreams.pools.values():
                servers = []
                for member in pool.members:
                    state = member.state
                    failures = dict((reason, n) for reason, n in state.ends.items() if reason != COMPLETED and n)
                    if state.connect_failures:
                        failures["connect"] = state.connect_failures
                    checked, check = state.last_check or (None, None)
                    servers.append({
                        "name": member.name, "host": state.host, "port": state.port, "tls": state.tls,
                        "backup": member.backup, "state": "up" if state.up else "down", "why": state.why_down,
                        "since": state.since, "admin": member.admin, "live": state.active, "max": member.max,
                        "weight": member.weight, "sessions": state.sessions, "failures": failures,
                        "checked": checked if pool.settings.check != "none" else None, "check": check})
                pools.append({"name": pool.name, "mode": pool.mode, "live": pool.active,
                              "sessions": pool.state.sessions, "capacity": pool.capacity, "servers": servers})
            return {"version": __version__, "python": sys.version.split()[0], "pid": os.getpid(), "now": now,
                    "started": self.started_at, "uptime": time.monotonic() - self.started,
                    "config": self.config.source, "reloads": stats.reloads,
                    "last_reload": "ok" if stats.reload_ok else "failed", "sessions_live": len(self.sessions),
                    "slots_held": self.active, "sessions_total": stats.sessions,
                    "connections_total": stats.connections, "max_sessions": self.settings.max_sessions,
                    "open_files": self.open_files, "draining": self.draining,
                    "failures": dict((reason, stats.failures[reason]) for reason in REASONS if reason != COMPLETED),
                    "pools": pools}

    def live_session_list(self):
        """``show sessions``: the live sessions, oldest first."""
        now = time.monotonic()
        with self.lock:
            sessions = list(self.sessions)
        rows = []
        for session in sorted(sessions, key=lambda s: s.started):
            member, pool, route = session.member, session.pool, session.route   # read once: they change
            rows.append({"client": session.client_name, "request": session.request_url,
                         "route": route.name if route else "-", "pool": pool.name if pool else "-",
                         "server": member.name if member else "-", "age": now - session.started,
                         "bytes_up": session.bytes_up, "bytes_down": session.bytes_down})
        return rows

    def find_member(self, text):
        """``(pool, member)`` for ``POOL/HOST:PORT`` (``/tls`` after it for a TLS server), else why not."""
        pool_name, _, server = text.partition("/")
        with self.lock:
            pool = self.upstreams.pools.get(pool_name)
            if pool is None:
                return "no pool %r (expected POOL/HOST:PORT)" % pool_name
            matches = [m for m in pool.members if server in (m.name, format_address(m.state.host, m.state.port))]
            names = ", ".join(m.name for m in pool.members)
        if len(matches) != 1:
            return "%s server %r in pool %s (it has %s)" % ("no" if not matches else "more than one", server,
                                                             pool_name, names)
        return pool, matches[0]

    def set_admin(self, pool, member, admin):
        with self.lock:
            before = member.state.set_admin(pool.name, admin, time.monotonic())
        if before != admin:
            log.warning("server %s of pool %s: %s -> %s (control socket)", member.name, pool.name, before, admin)
        return Answer(True, "%s/%s: %s (was %s)\n" % (pool.name, member.name, admin, before),
                      {"server": "%s/%s" % (pool.name, member.name), "admin": admin, "was": before})

    def set_weight(self, pool, member, weight):
        with self.lock:
            before = member.weight
            member.set_weight(weight)
        log.warning("server %s of pool %s: weight %d -> %d (control socket)", member.name, pool.name, before, weight)
        return Answer(True, "%s/%s: weight %d (was %d)\n" % (pool.name, member.name, weight, before),
                      {"server": "%s/%s" % (pool.name, member.name), "weight": weight, "was": before})

    def live_sessions(self, pool_name, member):
        """Live sessions of pool *pool_name* holding a slot on *member*'s server."""
        with self.lock:
            return sum(1 for s in self.sessions if s.member is not None and s.member.state is member.state
                       and s.pool is not None and s.pool.name == pool_name)

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
            metric("connections_waiting", "gauge", "Connections holding no server slot yet (counted against "
                   "max_connections).", [((), len(self.sessions) - self.active)])
            metric("failures_total", "counter", "Sessions not relayed, by reason.",
                   [((("reason", r),), n) for r, n in sorted(stats.failures.items())])
            metric("bytes_total", "counter", "Bytes relayed.",
                   [((("direction", "up"),), stats.bytes_up), ((("direction", "down"),), stats.bytes_down)])
            metric("pool_sessions_active", "gauge", "Live sessions per pool.",
                   [((("pool", p.name),), p.active) for p in self.upstreams.pools.values()])
            metric("pool_sessions_total", "counter", "Ended sessions per pool.",
                   [((("pool", p.name),), p.state.sessions) for p in self.upstreams.pools.values()])
            pools = list(self.upstreams.pools.values())
            metric("pool_queue_length", "gauge", "Sessions waiting in the pool's queue for a slot.",
                   [((("pool", p.name),), len(p.state.queue)) for p in pools])
            metric("pool_queue_timeouts_total", "counter", "Sessions that waited queue_timeout and got BUSY.",
                   [((("pool", p.name),), p.state.queue_timeouts) for p in pools])
            out.append("# HELP agiproxy_pool_queued_seconds Time sessions waited in the pool's queue.\n"
                       "# TYPE agiproxy_pool_queued_seconds histogram\n")
            for pool in pools:
                name = pool.name.replace("\\", "\\\\").replace('"', '\\"')
                out += pool.state.queued.lines("pool_queued_seconds", 'pool="%s",' % name)
            labels = [(("pool", p.name), ("server", m.name)) for p, m in members]
            metric("server_up", "gauge", "1 when the server takes sessions.",
                   [(l, int(m.state.up)) for l, (p, m) in zip(labels, members)])
            metric("server_sessions_active", "gauge", "Live sessions per server.",
                   [(l, m.state.active) for l, (p, m) in zip(labels, members)])
            metric("server_admin_state", "gauge", "1 for the admin state the server is in (ready, drain, maint).",
                   [(l + (("state", admin),), int(m.admin == admin)) for l, (p, m) in zip(labels, members)
                    for admin in ADMIN_STATES])
            metric("server_sessions_max", "gauge", "max= of the server line (0: no limit).",
                   [(l, m.max) for l, (p, m) in zip(labels, members)])
            now = time.monotonic()
            metric("server_share", "gauge", "Fraction of its weight the server has now (agent, slow start).",
                   [(l, "%.3f" % (m.share(now, p.settings.slowstart) / m.weight)) for l, (p, m) in zip(labels, members)])
            metric("server_sessions_total", "counter", "Ended sessions per server.",
                   [(l, m.state.sessions) for l, (p, m) in zip(labels, members)])
            metric("server_connect_failures_total", "counter", "Failed connects per server.",
                   [(l, m.state.connect_failures) for l, (p, m) in zip(labels, members)])
            out.append("# HELP agiproxy_session_duration_seconds Length of relayed sessions.\n"
                       "# TYPE agiproxy_session_duration_seconds histogram\n")
            out += stats.durations.lines("session_duration_seconds")
            metric("config_reloads_total", "counter", "Successful configuration reloads.", [((), stats.reloads)])
            metric("config_last_reload_success", "gauge", "1 when the last reload worked.", [((), stats.reload_ok)])
            metric("log_dropped_total", "counter", "Log lines dropped because the log could not keep up.",
                   [((), log_dropped())])
        return "".join(out)


###############################################################################
# Control socket, status page and metrics endpoint ############################
###############################################################################


def format_age(seconds):
    """``42s``, ``7m03s``, ``5h02m`` or ``3d04h``: how long ago, for people."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    if seconds < 86400:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd%02dh" % (seconds // 86400, seconds % 86400 // 3600)


def format_table(headings, rows):
    """Rows of text as columns aligned under *headings*, one line each."""
    rows = [headings] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(headings))]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n"
                   for row in rows)


def format_counts(counts):
    return " ".join("%s=%d" % item for item in sorted(counts.items()) if item[1]) or "-"


def describe_check(server, now):
    if server["checked"] is None:
        return "-"
    return "%s %s ago" % ("ok" if server["check"] is None else "failed: %s" % server["check"],
                          format_age(now - server["checked"]))


def render_servers(status):
    """``show servers``: one line per pool and server."""
    now = status["now"]
    rows = [[pool["name"] + "/" + server["name"], server["state"] + (" (%s)" % server["why"] if server["why"] else ""),
             format_age(now - server["since"]), server["admin"],
             "%d/%s" % (server["live"], server["max"] or "-"), server["weight"], server["sessions"],
             format_counts(server["failures"]), describe_check(server, now)]
            for pool in status["pools"] for server in pool["servers"]]
    return format_table(["SERVER", "STATE", "SINCE", "ADMIN", "LIVE/MAX", "WEIGHT", "SESSIONS", "FAILURES",
                         "LAST CHECK"], rows)


def render_sessions(sessions):
    """``show sessions``: one line per live session."""
    rows = [[s["client"], printable(s["request"], REQUEST_COLUMNS), s["route"], s["pool"], s["server"],
             format_age(s["age"]), s["bytes_up"], s["bytes_down"]] for s in sessions]
    return format_table(["CLIENT", "REQUEST", "ROUTE", "POOL", "SERVER", "AGE", "BYTES UP", "BYTES DOWN"], rows)


def render_info(status):
    """``show info``: the proxy as a whole."""
    limits = "max_sessions %s, open-file limit %s" % (status["max_sessions"] or "unlimited", status["open_files"])
    lines = [("version", "agiproxy %s on Python %s, pid %d" % (status["version"], status["python"], status["pid"])),
             ("uptime", format_age(status["uptime"])),
             ("config", status["config"]),
             ("reloads", "%d, last %s" % (status["reloads"], status["last_reload"])),
             ("sessions", "%d live (%d holding a server slot), %d ended, %d connections" % (
                 status["sessions_live"], status["slots_held"], status["sessions_total"],
                 status["connections_total"])),
             ("failures", format_counts(status["failures"])),
             ("limits", limits),
             ("state", "draining" if status["draining"] else "serving")]
    return "".join("%-9s %s\n" % line for line in lines)


def html_escape(value):
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


STATUS_PAGE_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#1d232b}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:20px 0 6px}h2 small{font-weight:normal;color:#59626e}
.facts,.failures{display:flex;flex-wrap:wrap;gap:6px 18px;margin:4px 0;padding:0;list-style:none}
.failures li{background:#fff;border:1px solid #d8dde3;border-radius:4px;padding:2px 8px}
.failures .hot{border-color:#c62828;color:#c62828;font-weight:bold}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d8dde3}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e6e9ed;vertical-align:middle;white-space:nowrap}
th{background:#eef1f4;font-weight:600}
.word{display:inline-block;min-width:3.5em;text-align:center;border-radius:3px;padding:1px 6px;color:#fff;font-weight:600}
.up{background:#2e7d32}.down{background:#c62828}.ready{background:#546e7a}.drain{background:#ef6c00}.maint{background:#6a1b9a}
.bar{display:inline-block;width:90px;height:10px;background:#e6e9ed;border-radius:5px;vertical-align:middle;margin-right:6px}
.bar span{display:block;height:100%;border-radius:5px;background:#1565c0}
.why{color:#59626e;white-space:normal}
@media (max-width:720px){table,tbody,tr,td{display:block;width:auto}thead{display:none}
tr{margin:0 0 10px;border:1px solid #d8dde3;background:#fff}td{border:0;padding:3px 8px;white-space:normal}
td:before{content:attr(data-label);display:inline-block;min-width:7em;color:#59626e}}
"""


def render_status_page(status, refresh):
    """The status page (GET /): every pool and server, the proxy's counters; no external resource."""
    now = status["now"]
    out = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
           '<meta name="viewport" content="width=device-width, initial-scale=1">'
           '<meta http-equiv="refresh" content="%d"><title>agiproxy status</title><style>%s</style></head><body>'
           % (refresh, STATUS_PAGE_STYLE)]
    out.append('<h1>agiproxy %s</h1><ul class="facts" id="info"><li>up %s</li><li>%s</li>'
               '<li>reloads %d, last <b id="last-reload">%s</b></li><li id="live">%d live sessions</li>'
               '<li>%d ended</li><li>%s</li></ul>' % (
                   html_escape(status["version"]), format_age(status["uptime"]), html_escape(status["config"]),
                   status["reloads"], status["last_reload"], status["sessions_live"], status["sessions_total"],
                   "draining" if status["draining"] else "serving"))
    out.append('<ul class="failures" id="failures">')
    for reason, count in sorted(status["failures"].items(), key=lambda item: REASONS.index(item[0])):
        out.append('<li%s data-reason="%s">%s <b>%d</b></li>' % (' class="hot"' if count else "", reason, reason,
                                                                 count))
    out.append("</ul>")
    labels = ["Server", "State", "Admin", "Live / max", "Weight", "Sessions", "Failures", "Last check"]
    for pool in status["pools"]:
        out.append('<h2 id="pool-%s">pool %s <small>%s, %d live, %d sessions</small></h2><table><thead><tr>%s'
                   '</tr></thead><tbody>' % (html_escape(pool["name"]), html_escape(pool["name"]), pool["mode"],
                                             pool["live"], pool["sessions"],
                                             "".join("<th>%s</th>" % label for label in labels)))
        for server in pool["servers"]:
            share = min(100, 100 * server["live"] // server["max"]) if server["max"] else 0
            cells = [
                html_escape(server["name"]) + (" <small>backup</small>" if server["backup"] else ""),
                '<span class="word %s">%s</span> <span class="why">for %s%s</span>' % (
                    server["state"], server["state"], format_age(now - server["since"]),
                    html_escape(": " + server["why"] if server["why"] else "")),
                '<span class="word %s">%s</span>' % (server["admin"], server["admin"]),
                '<span class="bar"><span style="width:%d%%"></span></span>%d / %s' % (
                    share, server["live"], server["max"] or "&infin;"),
                server["weight"], server["sessions"], html_escape(format_counts(server["failures"])),
                html_escape(describe_check(server, now))]
            out.append('<tr class="server" data-server="%s/%s" data-state="%s" data-admin="%s">%s</tr>' % (
                html_escape(pool["name"]), html_escape(server["name"]), server["state"], server["admin"],
                "".join('<td data-label="%s">%s</td>' % (label, cell) for label, cell in zip(labels, cells))))
        out.append("</tbody></table>")
    out.append("<p><small>Refreshes every %ds. Also: <a href=\"/status.json\">/status.json</a>, "
               "<a href=\"/metrics\">/metrics</a>.</small></p></body></html>\n" % refresh)
    return "".join(out)


def http_response(status, body, content_type="text/plain; charset=utf-8", head_only=False, extra=()):
    """A whole HTTP/1.0 answer; the connection closes after it."""
    if not isinstance(body, bytes):
        body = body.encode("utf-8")
    lines = ["HTTP/1.0 %s" % status, "Content-Type: %s" % content_type, "Content-Length: %d" % len(body),
             "Cache-Control: no-store", "Connection: close"] + list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


def parse_http_request(head):
    """Return ``(method, path)`` from an HTTP request head; raise ValueError if it is not HTTP/1."""
    words = head.split(b"\n", 1)[0].split()
    if len(words) != 3 or not words[2].startswith(b"HTTP/1.") or not words[1].startswith(b"/"):
        raise ValueError("not an HTTP/1 request line")
    return decode(words[0]), decode(words[1]).split("?")[0]


Answer = collections.namedtuple("Answer", "ok text data")


class WaitEmpty(object):
    """A ``wait server POOL/HOST:PORT empty TIMEOUT`` in progress; the console polls it."""

    def __init__(self, proxy, pool, member, timeout):
        self.proxy, self.pool, self.member, self.timeout = proxy, pool, member, timeout
        self.deadline = time.monotonic() + timeout

    def poll(self, now):
        """An Answer once the server's live sessions of the pool are 0 or the time is up; else None."""
        live = self.proxy.live_sessions(self.pool, self.member)
        name = "%s/%s" % (self.pool, self.member.name)
        if not live:
            return Answer(True, "%s: no live session\n" % name, {"server": name, "live": 0})
        if now >= self.deadline:
            return Answer(False, "%s: still %d live sessions after %gs" % (name, live, self.timeout),
                          {"server": name, "live": live})
        return None


class ControlCommands(object):
    """The control socket's line protocol, in the manner of HAProxy's runtime API.

    run() takes one command line and returns an Answer (ok, text, data for
    --json) or, for ``wait``, a WaitEmpty to poll.  A line starting with
    ``json`` asks for the answer as one JSON object.
    """

    HELP = [("help", "this list"),
            ("show info", "version, uptime, configuration, reloads, sessions, limits"),
            ("show servers", "every pool and server: state, admin state, live/max, weight, counters"),
            ("show sessions", "live sessions: client, request, route, pool, server, age, bytes"),
            ("set server POOL/HOST:PORT state ready|drain|maint", "drain: no new sessions, checks go on; "
                                                                  "maint: no new sessions, no checks"),
            ("set server POOL/HOST:PORT weight N", "until a reload changes its weight in the file"),
            ("wait server POOL/HOST:PORT empty TIMEOUT", "until its live sessions in POOL are 0 (fails after "
                                                         "TIMEOUT)")]

    def __init__(self, proxy):
        self.proxy = proxy

    def run(self, line):
        words = line.split()
        if words == ["help"]:
            return Answer(True, format_table(["COMMAND", "WHAT"], self.HELP), [c for c, _ in self.HELP])
        if words == ["show", "info"]:
            status = self.proxy.status()
            return Answer(True, render_info(status), dict((k, v) for k, v in status.items() if k != "pools"))
        if words == ["show", "servers"]:
            status = self.proxy.status()
            return Answer(True, render_servers(status), status["pools"])
        if words == ["show", "sessions"]:
            sessions = self.proxy.live_session_list()
            return Answer(True, render_sessions(sessions), sessions)
        if words[:2] == ["set", "server"] and len(words) == 5 and words[3] in ("state", "weight"):
            found = self.proxy.find_member(words[2])
            if isinstance(found, str):
                return Answer(False, found, None)
            if words[3] == "state":
                if words[4] not in ADMIN_STATES:
                    return Answer(False, "state must be ready, drain or maint, not %r" % words[4], None)
                return self.proxy.set_admin(found[0], found[1], words[4])
            try:
                weight = parse_count(words[4])
                if weight < 1:
                    raise ValueError("weight must be 1 or more")
            except ValueError as exc:
                return Answer(False, str(exc), None)
            return self.proxy.set_weight(found[0], found[1], weight)
        if words[:2] == ["wait", "server"] and len(words) == 5 and words[3] == "empty":
            found = self.proxy.find_member(words[2])
            if isinstance(found, str):
                return Answer(False, found, None)
            try:
                timeout = parse_duration(words[4])
            except ValueError as exc:
                return Answer(False, "TIMEOUT: %s" % exc, None)
            return WaitEmpty(self.proxy, found[0].name, found[1], timeout)
        if not words:
            return Answer(False, "empty command; try help", None)
        return Answer(False, "unknown command %r; try help" % printable(line.encode("utf-8"), 80), None)


def encode_answer(answer, as_json):
    """An Answer as the bytes the control socket sends."""
    if as_json:
        return json.dumps({"ok": answer.ok, "error": None if answer.ok else answer.text,
                           "text": answer.text if answer.ok else "", "data": answer.data}, sort_keys=True).encode() + b"\n"
    return encode(answer.text if answer.ok else "error: %s\n" % answer.text)


class ConsoleClient(object):
    """One connection to the stats endpoint or the control socket: what it sent, what it is owed."""

    def __init__(self, sock, name, endpoint, deadline):
        self.sock, self.name, self.endpoint = sock, name, endpoint
        self.deadline = deadline
        self.received = b""
        self.outgoing = b""         # the answer, once there is one
        self.waiting = None         # a WaitEmpty in progress
        self.as_json = False

    @property
    def answered(self):
        return bool(self.outgoing) or self.waiting is not None


class StatsEndpoint(object):
    """stats_listen: ``GET /`` (the status page), ``/status.json`` and ``/metrics``."""

    name = "stats"

    def __init__(self, proxy, address):
        self.proxy = proxy
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(CONSOLE_CLIENTS)
        except OSError:
            self.socket.close()
            raise
        self.address = self.socket.getsockname()[:2]
        self.clients = collections.OrderedDict()    # oldest first

    def timeout(self):
        return self.proxy.settings.stats_timeout

    def admit(self, peer):
        settings = self.proxy.settings
        return network_allowed(peer[0], settings.stats_allow, settings.stats_deny)

    def peer_name(self, peer):
        return format_address(peer[0], peer[1])

    @staticmethod
    def complete(received, start):
        """The request head once it is all there, else None."""
        for end in (b"\r\n\r\n", b"\n\n"):
            if received.find(end, max(0, start - len(end) + 1)) >= 0:
                return received
        return None

    def answer(self, client, head):
        try:
            method, path = parse_http_request(head)
        except ValueError:
            self.proxy.limited_log("console", logging.WARNING, "%s: stats: not an HTTP request; closed", client.name)
            return http_response("400 Bad Request", "not an HTTP/1 request\n")
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return http_response("405 Method Not Allowed", "GET only\n", extra=["Allow: GET, HEAD"])
        if path == "/":
            body, kind = render_status_page(self.proxy.status(), STATUS_REFRESH), "text/html; charset=utf-8"
        elif path == "/status.json":
            body, kind = json.dumps(self.proxy.status(), sort_keys=True, indent=1) + "\n", "application/json"
        elif path == "/metrics":
            body, kind = self.proxy.metrics(), "text/plain; version=0.0.4; charset=utf-8"
        else:
            return http_response("404 Not Found", "try /, /status.json or /metrics\n", head_only=head_only)
        return http_response("200 OK", body, kind, head_only)

    def too_long(self, client):
        self.proxy.limited_log("console", logging.WARNING, "%s: stats: request head over %d bytes; closed",
                               client.name, CONSOLE_REQUEST_LIMIT)
        return http_response("431 Request Header Fields Too Large", "request head too long\n")


class ControlEndpoint(object):
    """control_socket: one command line per connection, one answer, then the socket closes."""

    name = "control"

    def __init__(self, proxy, path, group):
        self.proxy = proxy
        self.path = path
        self.socket = bind_control_socket(path, group)
        self.inode = os.stat(path).st_ino
        self.commands = ControlCommands(proxy)
        self.clients = collections.OrderedDict()

    def timeout(self):
        return self.proxy.settings.control_timeout

    def admit(self, peer):
        return True     # the file's mode is the ACL

    def peer_name(self, peer):
        return "control socket client"

    @staticmethod
    def complete(received, start):
        end = received.find(b"\n", start)
        return received[:end] if end >= 0 else None

    def answer(self, client, line):
        try:
            text = line.rstrip(b"\r").decode("utf-8")
            if "\x00" in text:
                raise ValueError("NUL byte")
        except ValueError:
            self.proxy.limited_log("console", logging.WARNING, "control socket: a line that is not text; closed")
            return encode_answer(Answer(False, "not a command line (UTF-8 text, no NUL)", None), False)
        words = text.split(None, 1)
        client.as_json = bool(words) and words[0] == "json"
        if client.as_json:
            text = words[1] if len(words) > 1 else ""
        result = self.commands.run(text)
        if isinstance(result, WaitEmpty):
            return result
        return encode_answer(result, client.as_json)

    def too_long(self, client):
        self.proxy.limited_log("console", logging.WARNING, "control socket: line over %d bytes; closed",
                               CONSOLE_REQUEST_LIMIT)
        return encode_answer(Answer(False, "line too long", None), False)

    def remove(self):
        """Remove the socket file, unless another process has put its own there since."""
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError as exc:
            log.info("cannot remove control socket %s: %s (the next start replaces it)", self.path,
                     describe_error(exc))


def bind_control_socket(path, group):
    """Listen on a Unix stream socket at *path*, mode 0600 (0660 and owned by *group* if given).

    A socket file nobody answers on (left by a crash) is replaced; one that
    answers belongs to a running process: OSError."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, "control_socket = %s: exists and is not a socket" % path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)      # stale: its process is gone
        except OSError as exc:
            raise OSError(exc.errno, "control_socket = %s: %s" % (path, describe_error(exc)))
        else:
            raise OSError(errno.EADDRINUSE, "control_socket = %s: another process (agiproxy?) is serving it"
                          % path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = os.umask(0o117 if group else 0o177)      # created with its mode: no moment open to others
    try:
        sock.bind(path)
        if group:
            import grp
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(CONSOLE_CLIENTS)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, "control_socket = %s: %s" % (path, describe_error(exc)))
    except KeyError:
        sock.close()
        raise OSError(errno.EINVAL, "control_group = %s: no such group" % group)
    finally:
        os.umask(mask)
    return sock


class Console(object):
    """The stats endpoint and the control socket, served by one thread with one selector.

    Nothing here can hold a thread or a descriptor for long: every client
    has a deadline (stats_timeout, control_timeout, or its wait's own
    timeout), each endpoint serves at most CONSOLE_CLIENTS at once (the
    oldest one still sending is dropped for a new one), requests are
    bounded, and reads and writes never block.  The relay never waits on it.
    """

    def __init__(self, proxy):
        self.proxy = proxy
        self.endpoints = []
        self.selector = None
        self.thread = None
        self.stopping = threading.Event()
        self.wake_read = self.wake_write = None
        self.paused = {}        # endpoint -> when accepting resumes (out of descriptors)

    def add(self, endpoint):
        self.endpoints.append(endpoint)

    def start(self):
        if not self.endpoints:
            return
        self.selector = selectors.DefaultSelector()
        self.wake_read, self.wake_write = socket.socketpair()
        self.selector.register(self.wake_read, READ, None)
        for endpoint in self.endpoints:
            endpoint.socket.setblocking(False)
            self.selector.register(endpoint.socket, READ, endpoint)
        self.thread = threading.Thread(target=self.run, name="console", daemon=True)
        self.thread.start()

    def stop(self):
        """Close every client and endpoint; remove the control socket file."""
        self.stopping.set()
        if self.thread is not None:
            try:
                self.wake_write.send(b"\0")
            except OSError:
                pass
            self.thread.join(5)
        for endpoint in self.endpoints:
            for client in list(endpoint.clients):
                close_quietly(client.sock)
            endpoint.socket.close()
            if isinstance(endpoint, ControlEndpoint):
                endpoint.remove()
        self.endpoints = []

    def run(self):
        while not self.stopping.is_set():
            try:
                self._turn()
            except Exception:   # a bug costs one answer, never the endpoints
                log.exception("console: internal error")
        self.selector.close()
        self.wake_read.close()
        self.wake_write.close()

    def _turn(self):
        clients = [c for e in self.endpoints for c in e.clients]
        times = [c.deadline for c in clients] + list(self.paused.values())
        if any(c.waiting is not None for c in clients):
            times.append(time.monotonic() + WAIT_POLL)
        timeout = max(0.0, min(times) - time.monotonic()) if times else None
        for key, mask in self.selector.select(timeout):
            if key.data is None:
                self.wake_read.recv(64)
            elif isinstance(key.data, ConsoleClient):
                client = key.data
                if client in client.endpoint.clients:
                    if mask & WRITE:
                        self._send(client)
                    elif mask & READ:
                        self._receive(client)
            else:
                self._accept(key.data)
        now = time.monotonic()
        for client in clients:
            if client not in client.endpoint.clients:
                continue
            if client.waiting is not None:
                answer = client.waiting.poll(now)
                if answer is not None:
                    client.waiting = None
                    self._reply(client, encode_answer(answer, client.as_json))
            elif now >= client.deadline:
                self.proxy.limited_log("console", logging.WARNING, "%s: %s: %s after %gs; closed", client.name,
                                       client.endpoint.name, "answer not read" if client.outgoing else
                                       "no complete request", client.endpoint.timeout())
                self._close(client)
        for endpoint, when in list(self.paused.items()):
            if when <= now:
                del self.paused[endpoint]
                self.selector.register(endpoint.socket, READ, endpoint)

    def _accept(self, endpoint):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = endpoint.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in LOCAL_SHORTAGE:
                    self.proxy.limited_log("console", logging.ERROR, "%s: cannot accept: %s; pausing for 1s",
                                           endpoint.name, describe_error(exc))
                    self.selector.unregister(endpoint.socket)
                    self.paused[endpoint] = time.monotonic() + 1.0
                return
            name = endpoint.peer_name(peer)
            if not endpoint.admit(peer):
                self.proxy.limited_log("console-deny", logging.WARNING, "%s: denied by stats_allow/stats_deny; "
                                                                        "closed", peer[0])
                sock.close()
                continue
            if len(endpoint.clients) >= CONSOLE_CLIENTS and not self._make_room(endpoint):
                self.proxy.limited_log("console", logging.WARNING, "%s: %s: %d clients already; closed", name,
                                       endpoint.name, CONSOLE_CLIENTS)
                sock.close()
                continue
            sock.setblocking(False)
            client = ConsoleClient(sock, name, endpoint, time.monotonic() + endpoint.timeout())
            endpoint.clients[client] = True
            self.selector.register(sock, READ, client)

    def _make_room(self, endpoint):
        """Drop the oldest client still sending its request; False when every client has been answered."""
        for client in endpoint.clients:
            if not client.answered:
                self.proxy.limited_log("console", logging.WARNING, "%s: %s: dropped for a newer client (%d at once)",
                                       client.name, endpoint.name, CONSOLE_CLIENTS)
                self._close(client)
                return True
        return False

    def _receive(self, client):
        try:
            data = client.sock.recv(4096)
        except WOULD_BLOCK:
            return
        except OSError:
            data = b""
        if not data:
            self._close(client)     # gone, or has sent all it will: nobody to answer
            return
        if client.answered:
            return                  # more after the request: ignored
        start = len(client.received)
        client.received += data
        request = client.endpoint.complete(client.received, start)
        if request is not None:
            answer = client.endpoint.answer(client, request)
            if isinstance(answer, WaitEmpty):
                client.waiting = answer
                client.deadline = answer.deadline + client.endpoint.timeout()
            else:
                self._reply(client, answer)
        elif len(client.received) > CONSOLE_REQUEST_LIMIT:
            self._reply(client, client.endpoint.too_long(client))

    def _reply(self, client, data):
        client.outgoing = data
        client.deadline = time.monotonic() + client.endpoint.timeout()
        self._send(client)

    def _send(self, client):
        try:
            sent = client.sock.send(client.outgoing)
        except WOULD_BLOCK:
            sent = 0
        except OSError:
            self._close(client)
            return
        client.outgoing = client.outgoing[sent:]
        if client.outgoing:
            self.selector.modify(client.sock, WRITE, client)
        else:
            self._close(client)

    def _close(self, client):
        client.endpoint.clients.pop(client, None)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        close_quietly(client.sock)


###############################################################################
# Logging, signals and the daemon #############################################
###############################################################################


class LogQueue(logging.handlers.QueueHandler):
    """The agiproxy logger's only handler: records go to a bounded queue that one
    thread (a QueueListener, LogWriter) writes out, so that a stalled stderr pipe, syslog
    socket or disk never holds up a session.  When the queue is full records are
    dropped and counted (agiproxy_log_dropped_total); the first record that fits
    again is preceded by a line saying how many were lost."""

    def __init__(self):
        logging.handlers.QueueHandler.__init__(self, queue.Queue(LOG_QUEUE_SIZE))
        self.dropped = 0
        self.unreported = 0

    def prepare(self, record):
        """As it is: the writer thread formats it (agiproxy's arguments are strings and numbers,
        which do not change), so the thread that logs pays only for the record."""
        return record

    def enqueue(self, record):     # called with the handler's lock held
        try:
            if self.unreported:
                self.queue.put_nowait(self.prepare(logging.makeLogRecord({
                    "name": record.name, "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": "%d log lines dropped: the log could not keep up" % self.unreported})))
                self.unreported = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self.unreported += 1


class LogWriter(logging.handlers.QueueListener):
    """The log's one writer thread and its target handler, swapped on SIGHUP.

    Once the queue is empty it pauses for LOG_BATCH_PAUSE before waiting for
    more, so that the lines of many sessions cost it one wake-up (and the
    relay one GIL hand-off) instead of one each."""

    def __init__(self, handler):
        self.queue_handler = LogQueue()
        logging.handlers.QueueListener.__init__(self, self.queue_handler.queue, handler)
        self.pid = os.getpid()
        self.stopping = threading.Event()
        self.start()

    @property
    def handler(self):
        return self.handlers[0]

    def dequeue(self, block):
        if self.queue.empty():
            self.stopping.wait(LOG_BATCH_PAUSE)
        return self.queue.get(block)

    def swap(self, handler):
        old, self.handlers = self.handler, (handler,)
        old.close()

    def stop(self):
        """Write out what is queued, then end the thread; a stalled log is given up
        after LOG_STOP_TIMEOUT (QueueListener.stop would wait for ever)."""
        self.stopping.set()
        try:
            self.queue.put(self._sentinel, timeout=LOG_STOP_TIMEOUT)
        except queue.Full:
            return
        self._thread.join(LOG_STOP_TIMEOUT)


_writer = None


def _open_log_handler(target):
    """The handler that writes to *target* (stderr, syslog or a file); raise OSError if it cannot."""
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s agiproxy[%(process)d] %(levelname)s %(message)s"))
    elif target == "syslog":
        address = next((path for path in ("/dev/log", "/var/run/syslog") if os.path.exists(path)), None)
        if address is None:
            raise OSError(errno.ENOENT, "no syslog socket (/dev/log): is a syslog daemon running? "
                                        "Use log = stderr or log = /path/to/file")
        handler = logging.handlers.SysLogHandler(address, logging.handlers.SysLogHandler.LOG_DAEMON)
        if getattr(handler, "socket", None) is None:    # 3.11+ may defer the connect: try it now
            handler.close()
            raise OSError(errno.ECONNREFUSED, "cannot connect to the syslog socket %s" % address)
        handler.setFormatter(logging.Formatter("agiproxy[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.FileHandler(target)
        handler.setFormatter(logging.Formatter("%(asctime)s agiproxy[%(process)d] %(levelname)s %(message)s"))
    handler.agiproxy_target = target
    return handler


def log_target(settings, daemon=False):
    """Where the log goes: as configured, but syslog instead of stderr for a daemon."""
    return "syslog" if daemon and settings.log == "stderr" else settings.log


def setup_logging(settings, daemon=False, queued=True):
    """Send the log where *settings* say (syslog instead of stderr for a daemon); raise
    OSError, naming what is missing, when that cannot be opened.  *queued* False writes
    directly, without the writer thread (before --daemon forks: a fork copies no thread).

    Called again on SIGHUP: a log file that stays the same is reopened in place
    (for logrotate) under the handler's lock, so no line is lost or written to
    the rotated file; a new target's handler replaces the old one in the writer."""
    global _writer
    target = log_target(settings, daemon)
    log.setLevel(settings.log_level.upper())
    log.propagate = False
    if _writer is not None and _writer.pid == os.getpid():
        current = _writer.handler
        if getattr(current, "agiproxy_target", None) == target:
            if isinstance(current, logging.FileHandler):
                stream = current._open()      # first: if it fails, the old file goes on
                current.acquire()
                try:
                    current.stream, old = stream, current.stream
                finally:
                    current.release()
                old.close()
            return
        _writer.swap(_open_log_handler(target))
        return
    handler = _open_log_handler(target)
    if queued:
        _writer = LogWriter(handler)     # first start, or the daemon after its fork
        handler = _writer.queue_handler
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)


def log_dropped():
    """Log records dropped so far because the log could not keep up."""
    return _writer.queue_handler.dropped if _writer is not None else 0


def stop_logging():
    """Write out every queued record (at exit)."""
    if _writer is not None and _writer.pid == os.getpid():
        _writer.stop()


def connection_limit(settings):
    """max_connections, or when it is 0 a share of the open-file limit."""
    if settings.max_connections:
        return settings.max_connections
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return AUTO_CONNECTIONS_MAX
    return int(min(max(soft * AUTO_CONNECTIONS_SHARE, AUTO_CONNECTIONS_MIN), AUTO_CONNECTIONS_MAX))


def open_descriptors():
    """How many descriptors this process has open now (a guess of 16 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1     # less the one listdir() opened
    except OSError:
        return 16


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
                if not proxy.sessions:
                    log.warning("all sessions ended; exiting")
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    proxy.abort_sessions("drain_timeout = %gs reached" % proxy.settings.drain_timeout)
                    proxy.wait_sessions(FAILURE_REPLY_TIMEOUT + 1)
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


def explain(config, url, variables=None, out=sys.stdout, client=None):
    """Print how *url* would be routed (nodast's -t): every reroute hop, what the pool's
    DNS names resolve to now, the servers in the order tried.  Return 0 if routed, 1 if not."""
    header = AgiHeader.parse(synthetic_header(url, (), variables))
    request = parse_request(url)
    upstreams = Upstreams(config)
    hops = upstreams.router.hops(request, header.variables)
    (route, path, query), hops = hops[-1], hops[:-1]
    out.write("request:  %s\n" % url)
    for hop, hop_path, hop_query in hops:
        out.write("reroute:  route %s rewrites it to %s%s and routes it again\n"
                  % (hop.name, hop_path, "?" + hop_query if hop_query else ""))
    if route is None:
        out.write("route:    none: the session would get %s=NOROUTE and FAILURE\n" % config.settings.failure_variable)
        return 1
    kind = "conditions, in file order" if route.conditional else \
        ("catch-all" if route.path == "*" else "longest path %s" % route.path)
    out.write("route:    %s (%s)\n" % (route.name, kind))
    pool = upstreams.pools[route.pool]
    settings = pool.settings
    extras = ["mode " + pool.mode,
              "queue_timeout = %gs, max_queue = %d" % (settings.queue_timeout, settings.max_queue)
              if settings.queue_timeout else "",
              "slowstart = %gs" % settings.slowstart if settings.slowstart else "",
              "agent every %gs" % settings.agent_interval if any(m.agent_port for m in pool.named) or
              settings.agent_port or any(line.agent_port for line in pool.lines) else ""]
    out.write("pool:     %s (%s)\n" % (pool.name, "; ".join(e for e in extras if e)))
    explain_discovery(pool, client or DnsClient.configured(config.settings), out)
    order = pool.order(header.variables, "127.0.0.1")
    if not order:
        out.write("servers:  none now: the session would get %s=NOUPSTREAM and FAILURE\n"
                  % config.settings.failure_variable)
        return 1
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


def explain_discovery(pool, client, out):
    """Look up the resolve and srv lines of *pool* now, print what they name and make
    those the pool's servers (for -t and --check)."""
    for line in pool.lines:
        try:
            entries = discover(line, client)
        except (DnsError, OSError, ValueError) as exc:
            out.write("dns:      pool %s: %s %s: lookup failed: %s\n" % (pool.name, line.discover, line.host,
                                                                      describe_error(exc)))
            continue
        out.write("dns:      pool %s: %s %s -> %s\n" % (pool.name, line.discover, line.host, ", ".join(
            "%s weight=%d%s" % (format_address(host, port), weight, " backup" if backup else "")
            for host, port, weight, backup in entries)))
        pool.set_discovered(line, entries, {}, 0.0, joining=False)


def control(path, command, as_json=False, timeout=5.0, out=sys.stdout, err=sys.stderr):
    """Send *command* to the control socket at *path* and print the answer.

    Returns 0 when it was done, 1 when the proxy refused it (the reason goes
    to *err*), 2 when the socket cannot be reached or the answer read."""
    words = command.split()
    if words[:1] == ["wait"]:
        try:
            timeout += parse_duration(words[-1])    # the proxy answers once the wait is over
        except (ValueError, IndexError):
            pass                                    # the proxy says what is wrong with it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    received = b""
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"json " + command.encode("utf-8") + b"\n")
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        answer = json.loads(received.decode("utf-8"))
    except (OSError, ValueError) as exc:
        err.write("agiproxy: control socket %s: %s\n" % (path, describe_error(exc) if isinstance(exc, OSError)
                                                         else "not an answer: %s" % printable(received, 200)))
        return 2
    finally:
        sock.close()
    if not answer["ok"]:
        err.write("agiproxy: %s\n" % answer["error"])
        return 1
    out.write(json.dumps(answer["data"], indent=1, sort_keys=True) + "\n" if as_json else answer["text"])
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
    parser.add_argument("--ctl", metavar="COMMAND", help="send COMMAND to the running proxy's control socket "
                                                          "(--ctl help lists them); exit 1 if refused, 2 if unreachable")
    parser.add_argument("--socket", metavar="PATH", help="--ctl: the control socket (default: control_socket of -c)")
    parser.add_argument("--json", action="store_true", help="--ctl: print the answer as JSON")
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
    if args.ctl is not None and args.socket:
        return control(args.socket, args.ctl, args.json)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write("agiproxy: %s\n" % exc)
        return 2
    if args.ctl is not None:
        if not config.settings.control_socket:
            sys.stderr.write("agiproxy: %s: control_socket is not set (or give --socket PATH)\n" % args.config)
            return 2
        return control(config.settings.control_socket, args.ctl, args.json, config.settings.control_timeout)
    if args.check:
        for warning in regex_warnings(config):
            sys.stderr.write("agiproxy: %s: warning: %s\n" % (args.config, warning))
        sys.stdout.write("%s: configuration OK (%d routes, %d pools)\n"
                         % (args.config, len(config.routes), len(config.pools)))
        client = DnsClient.configured(config.settings)
        for pool in Upstreams(config).pools.values():
            explain_discovery(pool, client, sys.stdout)
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
        return _serve(config, args)
    finally:
        stop_logging()      # every queued line is written before the process exits


def _serve(config, args):
    try:
        setup_logging(config.settings, queued=not args.daemon)
        if args.daemon:     # said here, while stderr is still the terminal, not after detaching
            _open_log_handler(log_target(config.settings, daemon=True)).close()
    except OSError as exc:
        sys.stderr.write("agiproxy: %s: log = %s: %s\n" % (args.config, log_target(config.settings, args.daemon),
                                                           describe_error(exc)))
        return 2
    threading.stack_size(THREAD_STACK_SIZE)
    files = raise_open_file_limit()
    proxy = Proxy(config)
    proxy.daemon = args.daemon
    proxy.open_files = files
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
    allowed = max(0, (files - open_descriptors() - FD_RESERVE) // 2)   # two a session, a few for the rest
    wanted = max(config.settings.max_sessions, SESSIONS_FLOOR)
    log.log(logging.WARNING if allowed < wanted else logging.INFO,
            "agiproxy %s on Python %s: %d routes, %d pools; open-file limit %d allows about %d sessions%s",
            __version__, sys.version.split()[0], len(config.routes), len(config.pools), files, allowed,
            "" if allowed >= wanted else " (fewer than %s %d: raise the limit, e.g. LimitNOFILE= or ulimit -n)"
            % ("max_sessions =" if config.settings.max_sessions >= SESSIONS_FLOOR else "a sane floor of", wanted))
    for warning in regex_warnings(config):
        log.warning("%s", warning)
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
