"""Checkpoint upload throughput to S3 against the server's raw PUT throughput, in one run.

    python bench/s3_bench.py [--state-mb 100] [--rounds 3]

Starts the tests' S3-compatible server on loopback (moto's, ``tests/s3.py``), then per round
and in turn: raw PUTs of the same bytes in as many objects as a checkpoint has files (s3fs
``pipe_file``, nothing else), our synchronous save of a model + AdamW state to an
``s3://`` root (shards through DCP with crc32s taken while uploading, then the record), and
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
            raw, ours, mirrored = [], [], []
            for round_ in range(args.rounds):
                manifest = local.save(1 + round_).manifest
                files = {name: Path(tmp, "local", f"step-{1 + round_:08d}", name).read_bytes()
                         for name in manifest.files}
                started = time.monotonic()
                for name, data in files.items():
                    client.pipe_file(f"bench/raw/{round_}/{name}", data)
                raw.append(time.monotonic() - started)
                started = time.monotonic()
                remote.save(1 + round_)
                ours.append(time.monotonic() - started)
                started = time.monotonic()
                mirror.submit(1 + round_)
                mirror.wait()
                mirrored.append(time.monotonic() - started)
                nbytes = manifest.total_bytes
                print(f"[s3 bench] round {round_ + 1}: {nbytes / 1e6:.0f} MB in {len(files)} objects: raw PUT "
                      f"{raw[-1]:.2f} s, our save {ours[-1]:.2f} s, mirror upload {mirrored[-1]:.2f} s", flush=True)
            mirror.close()
            remote.close()
            local.close()
        finally:
            server.kill()
    mb = nbytes / 1e6
    r, o, m = statistics.median(raw), statistics.median(ours), statistics.median(mirrored)
    print(f"\n| | seconds (median of {args.rounds}) | MB/s | vs raw PUT |\n|---|---|---|---|\n"
          f"| raw PUT (s3fs pipe_file) | {r:.2f} | {mb / r:.0f} | 1.00x |\n"
          f"| our save to s3:// (DCP shards + crc32 while uploading + record) | {o:.2f} | {mb / o:.0f} | {r / o:.2f}x |\n"
          f"| our mirror upload of a local commit | {m:.2f} | {mb / m:.0f} | {r / m:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
