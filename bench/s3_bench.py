"""Checkpoint upload throughput to S3 against the server's raw PUT throughput, in one run.

    python bench/s3_bench.py [--state-mb 100] [--rounds 3]

Starts the tests' S3-compatible server on loopback (moto's, ``tests/s3.py``), then per round
and in turn: raw PUTs of the same bytes, split in as many objects as our save writes and
sent at once (s3fs ``pipe``, nothing else); our synchronous save of a model + AdamW state to
an ``s3://`` root (shards through DCP, ``io_threads`` automatic, crc32s taken while
uploading, then the record); the same save with one upload stream (``io_threads=1``); and
our mirror's upload of a local commit (``--mirror``). Prints medians and the ratios.
Loopback moto is CPU-bound Python, so the absolute figures say little about a real store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state-mb", type=float, default=100)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import torch

    from checkpoint import CheckpointManager
    from checkpoint.config import OBJECT_STORE_IO_THREADS
    from checkpoint.mirror import Mirror
    from checkpoint.storage import Storage
    from s3 import S3Server

    torch.manual_seed(0)
    width = 1024
    layers = max(1, round(args.state_mb * 1e6 / 12 / (width * (width + 1))))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    opt.step()

    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp)).start()
        try:
            os.environ.update(server.env())
            server.make_bucket("bench")
            client = server.client()
            local = CheckpointManager(os.path.join(tmp, "local"), model=model, optimizer=opt, keep_last=1)
            mirror = Mirror(local.storage, Storage("s3://bench/mirror"), keep_last=1, keep_every=0)
            remote = CheckpointManager("s3://bench/ours", model=model, optimizer=opt, keep_last=1)
            single = CheckpointManager("s3://bench/single", model=model, optimizer=opt, keep_last=1, io_threads=1)
            times: dict[str, list[float]] = {"raw": [], "ours": [], "single": [], "mirror": []}
            for round_ in range(args.rounds):
                step = 1 + round_
                manifest = local.save(step).manifest
                data = b"".join(Path(tmp, "local", f"step-{step:08d}", name).read_bytes() for name in manifest.files)
                pieces = OBJECT_STORE_IO_THREADS + 1  # our save's files: one per upload stream, and DCP's index
                cut = -(-len(data) // pieces)
                objects = {f"bench/raw/{round_}/{i}": data[i * cut:(i + 1) * cut] for i in range(pieces)}
                started = time.monotonic()
                client.pipe(objects)
                times["raw"].append(time.monotonic() - started)
                del objects, data
                for name, manager in (("ours", remote), ("single", single)):
                    started = time.monotonic()
                    manager.save(step)
                    times[name].append(time.monotonic() - started)
                started = time.monotonic()
                mirror.submit(step)
                mirror.wait()
                times["mirror"].append(time.monotonic() - started)
                nbytes = manifest.total_bytes
                print(f"[s3 bench] round {round_ + 1}: {nbytes / 1e6:.0f} MB: raw PUT {times['raw'][-1]:.2f} s, "
                      f"our save {times['ours'][-1]:.2f} s (one stream {times['single'][-1]:.2f} s), "
                      f"mirror upload {times['mirror'][-1]:.2f} s", flush=True)
            single.close()
            mirror.close()
            remote.close()
            local.close()
        finally:
            server.kill()
    mb = nbytes / 1e6
    med = {name: statistics.median(values) for name, values in times.items()}
    rows = [("raw PUT (s3fs pipe, the objects at once)", "raw"),
            (f"our save to s3:// (DCP shards in {OBJECT_STORE_IO_THREADS} upload streams + crc32 while uploading + record)",
             "ours"),
            ("our save to s3:// with io_threads=1 (one upload stream)", "single"),
            ("our mirror upload of a local commit (files at once, record last)", "mirror")]
    print(f"\n| | seconds (median of {args.rounds}) | MB/s | vs raw PUT |\n|---|---|---|---|")
    for label, name in rows:
        print(f"| {label} | {med[name]:.2f} | {mb / med[name]:.0f} | {med['raw'] / med[name]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
