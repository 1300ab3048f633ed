"""Generation 0: rank 1 freezes (SIGSTOP) before it ever reports; later generations finish.
The startup watchdog must call that a hang: a generation that never reaches its first step."""
import os
import signal

if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGSTOP)
print(f"generation {os.environ['TORCHELASTIC_RESTART_COUNT']} rank {os.environ['RANK']} done", flush=True)
