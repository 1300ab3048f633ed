"""The checkpoint layer's collectives on two real gloo ranks (torchrun): what every rank
gets back, on the fast paths (one message; one flag when all is usual) and the slow ones."""

from __future__ import annotations

import sys
from pathlib import Path

from procs import run


def test_broadcast_and_all_gather_give_every_rank_the_same_values(tmp_path):
    script = Path(__file__).parent / "scripts" / "collectives.py"
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                  str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.tail()
    for rank in range(2):
        assert (tmp_path / f"outcome-{rank}.txt").read_text() == "ok", rank
