"""The checkpoint layer's own collectives (``checkpoint._dist``) on two real gloo ranks: the
one-message broadcast (and its second message for a large object), and the all_gather that
gathers only when some rank's value is not the usual one. Each rank writes what it got to
ROOT/outcome-RANK.txt ("ok", or what differed).

    torchrun --nproc-per-node=2 collectives.py ROOT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpoint import _dist  # noqa: E402

root = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
problems = []


def expect(what, got, wanted):
    if type(got) is not type(wanted) or got != wanted:
        problems.append(f"{what}: got {got!r}, wanted {wanted!r}")


group = _dist.private_group()
for g in (None, group):
    expect("small broadcast", _dist.broadcast({"step": 20, "rank": rank}, g), {"step": 20, "rank": 0})
    big = "x" * 100_000 + str(rank)  # beyond the first message: sent in two
    expect("large broadcast", _dist.broadcast(big, g), "x" * 100_000 + "0")
    for extra in (0, 1):  # pickled: exactly the first message's room, and one byte more
        n = _dist._ONE_SHOT_BYTES - 8 - 19 + extra
        expect(f"broadcast at the edge + {extra}", _dist.broadcast(b"y" * n + bytes([rank]), g), b"y" * n + b"\0")
    expect("usual everywhere", _dist.all_gather(None, g, usual=None), [None, None])
    expect("unusual on rank 1", _dist.all_gather(None if rank == 0 else "bad", g, usual=None), [None, "bad"])
    expect("unusual on rank 0", _dist.all_gather(((None, None), "e") if rank == 0 else ((None, None), None), g,
                                                 usual=((None, None), None)), [((None, None), "e"), ((None, None), None)])
    got = _dist.all_gather(False if rank == 0 else 0, g, usual=False)  # 0 == False, but not the usual value
    expect("equal but not the usual type", [type(v) for v in got], [bool, int])
    got = _dist.all_gather(((np.arange(3), None), None), g, usual=((None, None), None))  # bool(array) raises
    expect("no bool comparison", [a.tolist() for (a, _), _ in got], [[0, 1, 2], [0, 1, 2]])
    expect("plain all_gather", _dist.all_gather(rank, g), [0, 1])
(root / f"outcome-{rank}.txt").write_text("; ".join(problems) or "ok")
dist.destroy_process_group()
