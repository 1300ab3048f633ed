"""A real S3-compatible server for the tests: moto's server, on loopback, in its own process.

    python tests/scripts/s3_server.py --journal FILE [--port P] [--die-on-put TEXT]

Prints the port it listens on (``--port 0``, the default: a free one), then serves until it is
killed. moto keeps objects in memory; to come back from a SIGKILL with what it held, as a
real server with a disk does, every request it served is appended to ``--journal`` (moto's
own recorder), and a server started on an existing journal replays it (through a private
server on another port: moto's state is per process) before it listens on ``--port``.
Objects uploaded in several parts cannot be replayed (moto's upload ids are random): the
tests' objects are small.

``--die-on-put TEXT``: on the first PUT whose path contains TEXT, read half of the body, then
SIGKILL this process: the server dies in the middle of an upload.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--journal", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--die-on-put", default="")
    args = p.parse_args()
    os.environ["MOTO_ENABLE_RECORDING"] = "1"  # read when moto is imported
    os.environ["MOTO_RECORDER_FILEPATH"] = args.journal

    from moto.moto_api import recorder
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    # moto's recorder appends each request with two writes of its own, from every serving
    # thread: concurrent uploads (a save's parallel streams) would interleave in the journal.
    record, journal_lock = recorder._record_request, threading.Lock()

    def record_one_at_a_time(*args, **kwargs):
        with journal_lock:
            return record(*args, **kwargs)

    recorder._record_request = record_one_at_a_time
    app = DomainDispatcherApplication(create_backend_app)

    def dies_on_put(environ, start_response):
        if (args.die_on_put and environ["REQUEST_METHOD"] == "PUT"
                and args.die_on_put in environ.get("PATH_INFO", "") + "?" + environ.get("QUERY_STRING", "")):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            environ["wsgi.input"].read(length // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return app(environ, start_response)

    if os.path.exists(args.journal) and os.path.getsize(args.journal):
        _trim_to_whole_lines(args.journal)  # a kill may have cut the last entry
        private = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
        serving = threading.Thread(target=private.serve_forever, daemon=True)
        serving.start()
        recorder.replay_recording(target_host=f"http://127.0.0.1:{private.server_address[1]}")
        private.shutdown()
        private.server_close()
    else:
        open(args.journal, "a").close()
    server = make_server("127.0.0.1", args.port, dies_on_put, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def _trim_to_whole_lines(path: str) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


if __name__ == "__main__":
    sys.exit(main())
