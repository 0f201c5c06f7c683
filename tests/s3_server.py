"""A real local S3 server for the object-storage tests: ``moto[server]`` in its own process on 127.0.0.1 at
a free port, waited for until it answers, and stopped by its pid (only the process this module started).

Also usable by hand (benchmarks/storage.py does): ``with S3Server() as server: server.env`` gives the
``AWS_*`` variables that point pluristeer (and any AWS client) at it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

ACCESS_KEY = "pluristeer-test"
SECRET_KEY = "pluristeer-test-secret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """``python -m moto.server`` on 127.0.0.1; :meth:`start` waits until it answers, :meth:`stop` ends it."""

    def __init__(self, port: int | None = None, *, start_timeout: float = 30, check_credentials: bool = False) -> None:
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.check_credentials = check_credentials  # moto then refuses every key it has not issued itself
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def start(self) -> S3Server:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "MOTO_PORT": str(self.port),
                    **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if self.check_credentials else {}),
                },
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto did not answer on {self.endpoint} in {self.start_timeout}s") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """End the server this object started (by its pid), and nothing else."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow client of this server that may create buckets (pluristeer's own never does)."""
        return pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            allow_bucket_creation=True,
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["S3Server", "free_port"]
