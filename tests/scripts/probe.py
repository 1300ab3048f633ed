"""What a pre-warmed worker sees: argv, cwd, an env var, stdout, and the exit it asks for."""
import os
import signal
import sys

print(f"argv={sys.argv[1:]} cwd={os.getcwd()} probe={os.environ.get('PROBE')} main={__name__}", flush=True)
print("to stderr", file=sys.stderr, flush=True)
how = sys.argv[1]
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if how == "raise":
    raise ValueError("probe raised")
sys.exit(int(how))
