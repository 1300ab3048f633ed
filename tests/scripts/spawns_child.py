"""Rank 0 starts a child process (as a data loader or an uploader would) and records its pid
in CHILDREN_DIR; in generation 0 it then fails, in later ones it finishes. Nothing the failed
generation started may survive the restart."""
import os
import subprocess
import sys

generation = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if os.environ["RANK"] == "0":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # sleep-ok: a child that lingers
    with open(os.path.join(os.environ["CHILDREN_DIR"], f"gen{generation}.pid"), "w") as f:
        f.write(str(child.pid))
    if generation == 0:
        sys.exit(3)
    child.kill()
print(f"generation {generation} rank {os.environ['RANK']} done", flush=True)
