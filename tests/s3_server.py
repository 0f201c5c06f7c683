"""A real local S3 server for the object-storage tests: ``moto[server]`` in its own process on 127.0.0.1 at
a free port, waited for until it answers, and stopped by its pid (only the process this module started).

Also usable by hand (benchmarks/storage.py does): ``with S3Server() as server: server.env`` gives the
``AWS_*`` variables that point pluristeer (and any AWS client) at it.

:class:`HoldingRelay` sits between a client and the server (a plain TCP relay on another free port) and holds
one chosen request: the fault tests use it to kill a process while its upload is in flight, at a point known
in advance instead of a race. :meth:`S3Server.multipart_uploads` / :meth:`S3Server.parts` read the uploads
begun and not completed (S3's ``ListMultipartUploads`` / ``ListParts``), which no object listing shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote

import pyarrow.fs as pafs

ACCESS_KEY = "pluristeer-test"
SECRET_KEY = "pluristeer-test-secret"
REGION = "us-east-1"
_XMLNS = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}


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
        """End the server this object started (by its pid), and nothing else; its log goes with it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.unlink(missing_ok=True)

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

    def _get_xml(self, path_and_query: str) -> ET.Element:
        # moto without check_credentials answers unsigned requests; these two calls have no pyarrow equivalent
        with urllib.request.urlopen(f"{self.endpoint}/{path_and_query}", timeout=10) as response:
            return ET.fromstring(response.read())

    def multipart_uploads(self, bucket: str) -> list[tuple[str, str]]:
        """``(key, upload_id)`` of every multipart upload begun in ``bucket`` and neither completed nor aborted."""
        root = self._get_xml(f"{bucket}?uploads")
        uploads = root.findall("s3:Upload", _XMLNS)
        return [(u.findtext("s3:Key", "", _XMLNS), u.findtext("s3:UploadId", "", _XMLNS)) for u in uploads]

    def parts(self, bucket: str, key: str, upload_id: str) -> list[int]:
        """The sizes of the parts the server holds for upload ``upload_id`` of ``key``."""
        root = self._get_xml(f"{bucket}/{quote(key)}?uploadId={quote(upload_id)}")
        return [int(p.findtext("s3:Size", "0", _XMLNS)) for p in root.findall("s3:Part", _XMLNS)]

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HoldingRelay:
    """A TCP relay from 127.0.0.1 (a free port) to ``upstream_port`` that passes every byte both ways, except
    the ``occurrence``-th request whose request line matches ``pattern`` (a regex over e.g.
    ``POST /bucket/key?uploadId=...``, the CompleteMultipartUpload of ``key``) and every later match: of those
    it forwards nothing, so the server never sees them and their client waits for an answer that never comes.
    :attr:`held` is set at the first one held (:attr:`request` holds its request line). :meth:`stop` closes
    every connection. Requests are recognised at the start of what the client sends (HTTP clients send a
    request's head in one write); one split otherwise is passed on, and :attr:`held` stays unset."""

    def __init__(self, upstream_port: int, pattern: str, *, occurrence: int = 1) -> None:
        self.upstream_port = upstream_port
        self.pattern = re.compile(pattern.encode())
        self.occurrence = occurrence
        self.held = threading.Event()
        self.request = ""
        self.matches = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._accepting = threading.Thread(target=self._accept, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HoldingRelay:
        self._accepting.start()
        return self

    def stop(self) -> None:
        self._close(self._listener)  # wakes the accept() (a close alone would leave it blocked, still accepting)
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        self._close(*sockets)
        for sock in sockets:
            sock.close()
        self._accepting.join(timeout=10)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _hold(self, data: bytes) -> int | None:
        """Where in ``data`` a request to hold begins (None: pass it all on)."""
        match = self.pattern.search(data)
        if match is None:
            return None
        with self._lock:
            self.matches += 1
            if self.matches < self.occurrence:
                return None
            if not self.held.is_set():
                self.request = data[match.start() :].split(b"\r\n", 1)[0].decode("latin-1")
                self.held.set()
        return match.start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        holding = False
        try:
            while data := client.recv(1 << 16):
                if holding:
                    continue  # the held request's rest (and anything after it): dropped
                start = self._hold(data)
                if start is not None:
                    holding, data = True, data[:start]
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            self._close(client, upstream)

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source, target)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by the other side
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> HoldingRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["HoldingRelay", "S3Server", "free_port"]
