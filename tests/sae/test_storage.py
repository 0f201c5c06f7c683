"""sae.storage on a real local S3 server (moto) and on local disk: round trips, whole-file visibility,
errors that name the URI, and an unreachable endpoint that fails in seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from sae import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same tests on a plain local path and on a fresh S3 bucket."""
    if request.param == "local":
        return tmp_path / "root"
    return storage.join(request.getfixturevalue("s3_bucket"), "prefix")


def test_round_trip_bytes_json_list_exists(root):
    data = bytes(range(256)) * 1000
    assert not storage.exists(storage.join(root, "a.bin"))
    storage.write_bytes(storage.join(root, "a.bin"), data)
    storage.write_json(storage.join(root, "b.json"), {"x": [1, 2], "y": "z"})
    storage.write_text(storage.join(root, "sub", "c.txt"), "hé")
    assert storage.read_bytes(storage.join(root, "a.bin")) == data
    assert storage.read_json(storage.join(root, "b.json")) == {"x": [1, 2], "y": "z"}
    assert storage.read_text(storage.join(root, "sub", "c.txt")) == "hé"
    assert storage.listdir(root) == ["a.bin", "b.json"]  # files only, not the sub-prefix
    assert storage.is_file(storage.join(root, "a.bin")) and storage.size(storage.join(root, "a.bin")) == len(data)
    written = storage.write_file(storage.join(root, "d.bin"), lambda tmp: Path(tmp).write_bytes(b"abc"))
    assert written.size == 3 and written.sha256 == storage.sha256(storage.join(root, "d.bin"))
    storage.delete(storage.join(root, "d.bin"))
    assert not storage.exists(storage.join(root, "d.bin"))
    assert storage.listdir(storage.join(root, "missing")) == []


def test_missing_object_names_the_uri(root):
    target = storage.join(root, "nope.json")
    with pytest.raises(FileNotFoundError, match=str(target).replace("?", r"\?")):
        storage.read_bytes(target)
    with pytest.raises(FileNotFoundError, match="nope.json"), storage.local_copy(target):
        pass


def test_failed_write_leaves_nothing_and_keeps_the_old_version(root):
    target = storage.join(root, "artifact.bin")
    storage.write_bytes(target, b"old")

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        storage.atomic_write(target, fail)
    assert storage.read_bytes(target) == b"old"
    assert storage.listdir(root) == ["artifact.bin"]  # no temp file left beside it


def test_object_is_invisible_until_its_upload_completes(s3_bucket, tmp_path):
    """A large (multipart) upload: a reader polling during it sees no object or the whole one, never a part."""
    target = storage.join(s3_bucket, "big.bin")
    data = bytes(range(256)) * (12 * 1024 * 4)  # 12 MiB: more than one 10 MB part
    seen: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                seen.append(storage.size(target))
            except FileNotFoundError:
                seen.append(0)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        storage.write_bytes(target, data)
    finally:
        done.set()
        reader.join()
    assert storage.sha256(target) == storage.write_file(tmp_path / "x", lambda p: Path(p).write_bytes(data)).sha256
    assert set(seen) <= {0, len(data)}, f"a reader saw a partial object: sizes {sorted(set(seen))}"
    assert 0 in seen  # the reader did run while the upload was going on


def test_uri_helpers_and_query_options(s3_server, s3_bucket, monkeypatch):
    query = f"endpoint_override={s3_server.endpoint}&region=us-east-1"
    uri = f"{s3_bucket}/p?{query}"
    assert storage.join(uri, "a", "b.json") == f"{s3_bucket}/p/a/b.json?{query}"
    assert storage.name(storage.join(uri, "b.json")) == "b.json"
    assert storage.display(uri) == f"{s3_bucket}/p"
    assert storage.is_uri("s3://b/k") and storage.is_uri("file:///tmp/x") and not storage.is_uri(Path("/tmp/x"))
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint now comes from the query alone
    storage.write_json(storage.join(uri, "q.json"), [1])
    fs, path = storage.resolve(storage.join(uri, "q.json"))
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket[5:]}/p/q.json"
    assert storage.read_json(storage.join(uri, "q.json")) == [1]
    with pytest.raises(storage.StorageError, match="unknown S3 option"):
        storage.resolve(f"{s3_bucket}/p?endpoint=x")


def test_file_uri_is_local(tmp_path):
    uri = f"file://{tmp_path}/store"
    storage.write_json(storage.join(uri, "m.json"), {"a": 1})
    assert json.loads((tmp_path / "store" / "m.json").read_text()) == {"a": 1}
    assert storage.listdir(uri) == ["m.json"]


def test_unreachable_endpoint_fails_in_seconds_naming_the_uri(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"s3://nobucket/store/manifest.json.*AWS_ENDPOINT_URL"):
        storage.read_bytes("s3://nobucket/store/manifest.json")
    with pytest.raises(storage.StorageError, match="s3://nobucket/store"):
        storage.write_bytes("s3://nobucket/store/x.bin", b"x")
    assert time.monotonic() - started < 10


def test_silent_endpoint_times_out_in_seconds(monkeypatch):
    """A server that accepts connections and never answers: the request timeout ends the wait."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        monkeypatch.setenv("PLURISTEER_S3_REQUEST_TIMEOUT", "1")
        monkeypatch.setenv("PLURISTEER_S3_MAX_ATTEMPTS", "1")
        started = time.monotonic()
        with pytest.raises(storage.StorageError, match="s3://silent/x"):
            storage.exists("s3://silent/x")
        assert time.monotonic() - started < 8


def test_bad_credentials_fail_in_seconds_naming_the_uri(monkeypatch):
    from tests.s3_server import S3Server

    with S3Server(check_credentials=True) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        started = time.monotonic()
        with pytest.raises(storage.StorageError, match=r"s3://locked/store/manifest.json.*ACCESS_DENIED"):
            storage.read_bytes("s3://locked/store/manifest.json")
        with pytest.raises(storage.StorageError, match=r"s3://locked/store/x.bin.*INVALID_ACCESS_KEY_ID"):
            storage.write_bytes("s3://locked/store/x.bin", b"x")
        assert time.monotonic() - started < 10


@pytest.mark.fault
def test_an_uploader_killed_mid_upload_leaves_no_object(s3_server, s3_bucket):
    """SIGKILL a process while its (multipart) upload is in flight: the object never appears."""
    import boto3

    target = storage.join(s3_bucket, "store", "shard-00000.parquet")
    code = (
        "import sys; from sae import storage; print('go', flush=True); "
        "storage.write_bytes(sys.argv[1], b'x' * (96 << 20))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", code, target], env=env, stdout=subprocess.PIPE)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    try:
        assert proc.stdout.readline() == b"go\n"
        deadline = time.monotonic() + 30
        while not client.list_multipart_uploads(Bucket=s3_bucket[5:]).get("Uploads"):
            assert proc.poll() is None and time.monotonic() < deadline, "the upload finished before it could be killed"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the process this test started
        proc.wait()
    assert client.list_multipart_uploads(Bucket=s3_bucket[5:]).get("Uploads")  # killed mid-upload
    assert not storage.exists(target) and storage.listdir(storage.join(s3_bucket, "store")) == []
