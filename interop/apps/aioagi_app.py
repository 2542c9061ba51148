"""FastAGI app written with aioagi's own API (AGIApplication, router.add_route, request.agi).

aioagi routes on agi_request's path and the channel type (agi_type) as the method.
Usage: aioagi_app.py PORT SCRIPT...  (each SCRIPT a path, without query, to register)."""
import logging
import sys

from aioagi import runner
from aioagi.app import AGIApplication


async def call(request):
    headers = request.headers
    seen = "script=%s;request=%s;arg1=%s;arg2=%s;fwd=%s" % tuple(
        headers.get(key, "-") for key in ("agi_network_script", "agi_request", "agi_arg_1", "agi_arg_2",
                                          "agi_x_fwd_for"))
    agi = request.agi
    await agi.answer()
    await agi.get_variable("CHANNEL")
    await agi.set_variable("AGI_SEEN", seen)
    await agi.verbose("hello", 1)
    await agi.exec_app("Wait", "0.2")


def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    app = AGIApplication()
    for script in sys.argv[2:]:
        app.router.add_route("*", "/" + script, call)
    print("READY", flush=True)
    runner.run_app(app, host="127.0.0.1", port=int(sys.argv[1]))


main()
