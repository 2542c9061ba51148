"""FastAGI app written with panoramisk's own API (Application, add_route, send_command).

Usage: panoramisk_app.py PORT SCRIPT...  (each SCRIPT an exact agi_network_script to route)."""
import asyncio
import logging
import sys

from panoramisk.fast_agi import Application


def seen(headers):
    return "script=%s;request=%s;arg1=%s;arg2=%s;fwd=%s" % tuple(
        headers.get(key, "-") for key in ("agi_network_script", "agi_request", "agi_arg_1", "agi_arg_2",
                                          "agi_x_fwd_for"))


async def call(request):
    for command in ("ANSWER", "GET VARIABLE CHANNEL", 'SET VARIABLE AGI_SEEN "%s"' % seen(request.headers),
                    'VERBOSE "hello" 1', "EXEC Wait 0.2"):
        result = await request.send_command(command)
        if result.get("error") == "AGIResultHangup" or "HANGUP" in str(result):
            return


def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = Application(loop=loop)
    for script in sys.argv[2:]:
        app.add_route(script, call)
    loop.run_until_complete(asyncio.start_server(app.handler, "127.0.0.1", int(sys.argv[1])))
    print("READY", flush=True)
    loop.run_forever()


main()
