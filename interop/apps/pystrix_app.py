"""FastAGI app written with pystrix's own API (FastAGIServer, register_script_handler, core actions).

Usage: pystrix_app.py PORT SCRIPT...  (each SCRIPT a path, without query, to register)."""
import re
import sys

import pystrix


def call(agi, args, kwargs, match, path):
    env = agi.get_environment()
    seen = "script=%s;request=%s;arg1=%s;arg2=%s;fwd=%s" % tuple(
        env.get(key, "-") for key in ("agi_network_script", "agi_request", "agi_arg_1", "agi_arg_2",
                                      "agi_x_fwd_for"))
    core = pystrix.agi.core
    try:
        agi.execute(core.Answer())
        agi.execute(core.GetVariable("CHANNEL"))
        agi.execute(core.SetVariable("AGI_SEEN", seen))
        agi.execute(core.Verbose("hello", 1))
        agi.execute(core.Exec("Wait", ("0.2",)))
    except (pystrix.agi.AGIHangup, pystrix.agi.AGIDeadChannelError) as exc:
        print("call ended by a hangup: %s" % exc.__class__.__name__, flush=True)   # as any real app must


def main():
    server = pystrix.agi.FastAGIServer(interface="127.0.0.1", port=int(sys.argv[1]))
    for script in sys.argv[2:]:
        server.register_script_handler(re.compile("^%s$" % re.escape(script)), call)
    print("READY", flush=True)
    server.serve_forever()


main()
