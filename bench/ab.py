#!/usr/bin/env python3
"""A/B of this checkout's agiproxy.py against another commit's, on bench.py.

Each round runs bench.py once per variant, in alternating order (A B, then
B A, ...), so that drift of the machine falls on both alike; the table gives
the median of the rounds and their spread (lowest-highest).  The last round
also holds idle sessions, for memory per session.

    python3 bench/ab.py --base 6e2e3fc                 # what `make bench` runs
    python3 bench/ab.py --base v1.0 --rounds 5 --duration 4
    python3 bench/ab.py --base 6e2e3fc --json > ab.json

Exit status: 0 clean, 1 if any run counted an error, 2 if a run failed.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="6e2e3fc", help="commit to compare with (6e2e3fc: agiproxy 1.0)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of A and B (3)")
    ap.add_argument("--duration", type=float, default=2.5, help="seconds per measurement (2.5)")
    ap.add_argument("--concurrency", default="8,64", help="closed-loop concurrencies (8,64)")
    ap.add_argument("--idle", default="1000", help="idle sessions held in the last round (1000; empty skips)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap.parse_args(argv)


def base_checkout(commit, folder):
    """Write *commit*'s agiproxy.py into *folder*; return its path."""
    try:
        text = subprocess.check_output(["git", "-C", REPO, "show", "%s:agiproxy.py" % commit])
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit("ab: cannot read agiproxy.py of %s: %s" % (commit, exc))
    path = os.path.join(folder, "agiproxy.py")
    with open(path, "wb") as handle:
        handle.write(text)
    return path


def bench_once(program, args, idle):
    command = [sys.executable, os.path.join(HERE, "bench.py"), "--json", "--rate", "0",
               "--duration", str(args.duration), "--concurrency", args.concurrency,
               "--proxy", "{python} %s -c {conf}" % program]
    command += ["--idle", args.idle] if idle else ["--skip-idle"]
    done = subprocess.run(command, stdout=subprocess.PIPE, universal_newlines=True)
    if done.returncode == 2 or not done.stdout.strip():
        sys.exit("ab: bench.py failed for %s (exit %d)" % (program, done.returncode))
    return json.loads(done.stdout)


def collect(result):
    """The figures compared, from one bench.py result: {name: value}."""
    figures = {"errors": result["errors_total"]}
    for run in result["runs"]:
        if run["mode"] != "run":
            continue
        key = "%s c=%d" % (run["target"], run["conc"])
        figures[key + " sessions/s"] = run["sessions_per_s"]
        figures[key + " setup p99 ms"] = (run["setup_ns"]["p99"] or 0) / 1e6
        figures[key + " rtt p50 us"] = (run["cmd_rtt_ns"]["p50"] or 0) / 1e3
        if run["target"] == "proxy":
            figures[key + " CPU us/session"] = run.get("proxy_cpu_us_per_session")
    for idle in result["idle"]:
        if idle.get("kib_per_session") is not None:
            figures["idle %d KiB/session" % idle["n"]] = idle["kib_per_session"]
    return figures


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    folder = tempfile.mkdtemp(prefix="agiab-")
    try:
        variants = [("A (this checkout)", os.path.join(REPO, "agiproxy.py")),
                    ("B (%s)" % args.base, base_checkout(args.base, folder))]
        rounds = {name: [] for name, _ in variants}
        for number in range(args.rounds):
            order = variants if number % 2 == 0 else variants[::-1]
            for name, program in order:
                sys.stderr.write("ab: round %d/%d, %s\n" % (number + 1, args.rounds, name))
                last = number == args.rounds - 1 and bool(args.idle.strip())
                rounds[name].append(collect(bench_once(program, args, last)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = {}
    for name, results in rounds.items():
        keys = sorted(set().union(*results))
        table[name] = {}
        for key in keys:
            values = [r[key] for r in results if r.get(key) is not None]
            if values:
                table[name][key] = {"median": statistics.median(values), "low": min(values),
                                    "high": max(values), "rounds": len(values)}
    if args.json:
        sys.stdout.write(json.dumps(table, indent=1, sort_keys=True) + "\n")
    else:
        render(table, [name for name, _ in variants], sys.stdout)
    errors = sum(cell["high"] for name in table for key, cell in table[name].items() if key == "errors")
    return 1 if errors else 0


def render(table, names, out):
    a, b = names
    keys = sorted(set(table[a]) | set(table[b]), key=lambda k: (k.split(" ")[0] != "proxy", k))
    out.write("%-32s %26s %26s %9s\n" % ("median (low-high) of rounds", a, b, "A/B"))
    for key in keys:
        cells = []
        for name in names:
            cell = table[name].get(key)
            cells.append("%.1f (%.1f-%.1f)" % (cell["median"], cell["low"], cell["high"]) if cell else "-")
        ca, cb = table[a].get(key), table[b].get(key)
        ratio = "%.2fx" % (ca["median"] / cb["median"]) if ca and cb and cb["median"] else "-"
        out.write("%-32s %26s %26s %9s\n" % (key, cells[0], cells[1], ratio))
    out.write("CPU us/session: the proxy's own CPU time per session served (lower is better).\n")


if __name__ == "__main__":
    sys.exit(main())
