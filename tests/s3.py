"""A real S3-compatible server on loopback for tests (``tests/scripts/s3_server.py``, moto),
which can be SIGKILLed and started again with what it held."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from procs import kill_tree

SERVER = str(Path(__file__).resolve().parent / "scripts" / "s3_server.py")
START_TIMEOUT = 60.0


class S3Server:
    """``start()`` on a free port; ``kill()``; ``start()`` again comes back on the same port
    with the objects it held (its journal is replayed)."""

    def __init__(self, workdir: Path):
        self.journal = workdir / "s3-journal.jsonl"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client process needs: the endpoint and credentials, the usual AWS way."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, die_on_put: str = "") -> "S3Server":
        cmd = [sys.executable, SERVER, "--journal", str(self.journal), "--port", str(self.port)]
        if die_on_put:
            cmd += ["--die-on-put", die_on_put]
        self.log = self.journal.with_suffix(".log")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.log, "a"), text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while not line and time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"the S3 server did not start (exit code {self.proc.returncode}):\n{tail}")
        self.port = int(line)
        # fsspec keeps one filesystem per set of options, whatever the environment says: one
        # made in this process for an earlier server would still talk to that server's port.
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        return self

    def wait_dead(self, timeout: float) -> int:
        """Wait for the server to die by itself (``die_on_put``); its exit code."""
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=30)

    stop = kill

    def client(self):
        """An s3fs filesystem on this server, for the test's own checks."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing",
                                 use_listings_cache=False, skip_instance_cache=True)

    def make_bucket(self, name: str) -> None:
        self.client().mkdir(name)


def client_env(server: S3Server) -> dict[str, str]:
    return {**os.environ, **server.env()}
