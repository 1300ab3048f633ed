"""``ftlaunch rendezvous``: a c10d rendezvous store that outlives every node.

Stock c10d rendezvous hosts its TCPStore inside the agent on the endpoint's host, so losing
that one agent takes every node down (pytorch issue #67742). Run this instead, as its own
process or service, on a machine that stays up::

    ftlaunch rendezvous --port 29400                     # on the rendezvous host
    ftlaunch --nnodes 2:3 --rdzv-endpoint HOST:29400 --rdzv-id job1 train.py ...   # on every node

Multi-node ftlaunch agents then only connect to it (``is_host=false``), so any node, the
first one included, can die while the others carry on.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import timedelta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ftlaunch rendezvous", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=29400, help="port to listen on (0: any free port)")
    parser.add_argument("--port-file", default="", help="write the port here once listening (useful with --port 0)")
    parser.error = lambda message: parser.exit(2, f"ftlaunch rendezvous: error: {message} (see --help)\n")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be 0..65535, got {args.port}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch.distributed as dist

    try:
        store = dist.TCPStore(args.host, args.port, is_master=True, multi_tenant=True,
                              wait_for_workers=False, timeout=timedelta(seconds=60))
    except (RuntimeError, ValueError) as e:
        print(f"ftlaunch rendezvous: error: cannot listen on {args.host}:{args.port} ({e})", file=sys.stderr)
        return 1
    print(f"ftlaunch rendezvous: store listening on {args.host}:{store.port} (pid {os.getpid()})", flush=True)
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(store.port))
        os.replace(tmp, args.port_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            signal.pause()  # the store serves from its own thread; this one only waits for a signal
    except KeyboardInterrupt:
        pass
    return 0
