"""Where artifacts live (DESIGN §3): a URI (``s3://bucket/prefix``, ``gs://``, ``file://``, any scheme
``pyarrow.fs`` knows) or a plain path, resolved to a :class:`pyarrow.fs.FileSystem` and a path in it.

Object stores have no rename, so every artifact is written whole: :func:`atomic_write` has the caller
write a local temp file, then either renames it onto a local target (temp file + rename, as before) or
uploads it to an object store in one stream (one PUT, or one multipart upload that only becomes visible
when completed), so a reader sees the complete object or none.

S3 settings come from the URI's query (``s3://bucket/key?endpoint_override=http://127.0.0.1:9000&region=x``)
or the standard AWS environment: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (pyarrow itself ignores
both, so they are read here and passed as ``endpoint_override``), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (unset: the SDK's own chain).
Timeouts and retries are small (``PLURISTEER_S3_CONNECT_TIMEOUT``, ``PLURISTEER_S3_REQUEST_TIMEOUT``,
``PLURISTEER_S3_MAX_ATTEMPTS``), so an unreachable endpoint or bad credentials fail in seconds with a
:class:`StorageError` that names the URI. No Ray in here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from sae import atomic

Location = str | os.PathLike
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_S3_QUERY = {"endpoint_override", "region", "scheme", "access_key", "secret_key", "session_token"}


class StorageError(OSError):
    """An object store cannot be reached, refuses the credentials, or fails a request (names the URI)."""


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3 (or S3-compatible) endpoint; :meth:`from_env` fills it from the environment."""

    endpoint_override: str | None = None  # "http://127.0.0.1:9000" or "minio:9000"; None: AWS itself
    region: str | None = None  # None: the SDK's default (us-east-1 for a custom endpoint)
    access_key: str | None = None  # None (with secret_key None): the SDK's credential chain
    secret_key: str | None = None
    session_token: str | None = None
    connect_timeout: float = 3.0  # seconds to open a connection
    request_timeout: float = 20.0  # seconds a request may make no progress
    max_attempts: int = 2  # tries per request (1 = no retry)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Options:
        env = dict(os.environ if env is None else env)
        get = lambda *names: next((env[n] for n in names if env.get(n)), None)  # noqa: E731
        return cls(
            endpoint_override=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            region=get("AWS_REGION", "AWS_DEFAULT_REGION"),
            access_key=get("AWS_ACCESS_KEY_ID"),
            secret_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            connect_timeout=float(get("PLURISTEER_S3_CONNECT_TIMEOUT") or cls.connect_timeout),
            request_timeout=float(get("PLURISTEER_S3_REQUEST_TIMEOUT") or cls.request_timeout),
            max_attempts=int(get("PLURISTEER_S3_MAX_ATTEMPTS") or cls.max_attempts),
        )


@lru_cache(maxsize=32)
def _s3(options: S3Options, scheme_override: str | None) -> pafs.S3FileSystem:
    endpoint, scheme = options.endpoint_override, scheme_override
    if endpoint and "://" in endpoint:
        parts = urlsplit(endpoint)
        scheme = scheme or parts.scheme
        endpoint = parts.netloc + parts.path.rstrip("/")
    return pafs.S3FileSystem(
        access_key=options.access_key,
        secret_key=options.secret_key,
        session_token=options.session_token,
        region=options.region or ("us-east-1" if endpoint else None),
        endpoint_override=endpoint,
        scheme=scheme or "https",
        connect_timeout=options.connect_timeout,
        request_timeout=options.request_timeout,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, options.max_attempts)),
    )


def is_uri(location: Location) -> bool:
    """True for ``scheme://...`` (not a plain or ``Path`` path; a Windows drive letter is not a scheme)."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def _split(uri: str) -> tuple[str, str, str]:
    """``(scheme, body, query)`` of ``uri``: ``s3://b/k?x=1`` -> ``("s3", "b/k", "x=1")``."""
    scheme, rest = uri.split("://", 1)
    body, _, query = rest.partition("?")
    return scheme.lower(), body, query


def resolve(location: Location) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``location`` and its path there (absolute for local paths, ``bucket/key`` for
    object stores: what ``pyarrow`` and Ray Train's ``storage_filesystem`` take)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(os.fspath(location)).expanduser().absolute())
    scheme, body, query = _split(str(location))
    if scheme == "file":
        return pafs.LocalFileSystem(), str(Path(body or "/").absolute())
    if scheme in ("s3", "s3a"):
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        unknown = sorted(set(params) - _S3_QUERY)
        if unknown:
            raise StorageError(f"{location}: unknown S3 option(s) {unknown}; known: {sorted(_S3_QUERY)}")
        base = S3Options.from_env()
        fields = {k: params[k] for k in _S3_QUERY - {"scheme"} if k in params}
        options = S3Options(**{**base.__dict__, **fields})
        return _s3(options, params.get("scheme")), body.strip("/")
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{location}: cannot open this location ({err})") from None


def join(location: Location, *parts: str) -> Location:
    """``location / part / ...``: a ``Path`` for a local path, a URI string (query kept last) for a URI."""
    if not is_uri(location):
        return Path(os.fspath(location)).joinpath(*parts)
    scheme, body, query = _split(str(location))
    body = "/".join([body.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{scheme}://{body}" + (f"?{query}" if query else "")


def name(location: Location) -> str:
    """The last component of ``location`` (``shard-00001.parquet``, ``L15-topk-8x``)."""
    if not is_uri(location):
        return Path(os.fspath(location)).name
    return _split(str(location))[1].rstrip("/").rsplit("/", 1)[-1]


def absolute(location: Location) -> Location:
    """A local path made absolute (as a ``Path``); a URI unchanged: what to hand to other processes."""
    return location if is_uri(location) else Path(os.fspath(location)).expanduser().resolve()


def local_parent(location: Location) -> Path:
    """A local directory for the side files of an artifact at ``location`` (W&B's offline runs): the parent
    directory of a local path; ``./runs`` for an object-store URI."""
    if is_uri(location):
        fs, path = resolve(location)
        return Path(path).parent if isinstance(fs, pafs.LocalFileSystem) else Path("runs")
    return Path(os.fspath(location)).parent


def display(location: Location) -> str:
    """``location`` for messages, without query parameters (they may hold credentials)."""
    return str(location).split("?", 1)[0] if is_uri(location) else str(location)


@contextmanager
def _io(location: Location) -> Iterator[None]:
    """Turn pyarrow's errors into :class:`FileNotFoundError` / :class:`StorageError` naming ``location``."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"{display(location)} does not exist") from None
    except (OSError, pa.ArrowException) as err:
        if isinstance(err, StorageError):
            raise
        hint = ""
        if is_uri(location):
            hint = "; check the endpoint (AWS_ENDPOINT_URL), region and credentials (AWS_ACCESS_KEY_ID, ...)"
        raise StorageError(f"{display(location)}: {err}{hint}") from None


def _info(location: Location) -> pafs.FileInfo:
    fs, path = resolve(location)
    with _io(location):
        return fs.get_file_info(path)


def exists(location: Location) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    return _info(location).type == pafs.FileType.File


def size(location: Location) -> int:
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{display(location)} does not exist")
    return int(info.size)


def listdir(location: Location) -> list[str]:
    """Names of the files directly inside ``location`` (sorted; ``[]`` when it does not exist)."""
    fs, path = resolve(location)
    with _io(location):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def makedirs(location: Location) -> None:
    """Create a local directory (and parents); nothing for an object store, where prefixes are implicit."""
    if is_uri(location):
        fs, path = resolve(location)
        if not isinstance(fs, pafs.LocalFileSystem):
            return
        location = path
    Path(os.fspath(location)).mkdir(parents=True, exist_ok=True)


def delete(location: Location) -> None:
    """Remove a file or object (nothing if it is not there)."""
    fs, path = resolve(location)
    with _io(location):
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def read_bytes(location: Location) -> bytes:
    fs, path = resolve(location)
    with _io(location), fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: Location) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: Location) -> Any:
    """The parsed JSON at ``location`` (:class:`json.JSONDecodeError` / :class:`UnicodeDecodeError` as is)."""
    return json.loads(read_text(location))


def sha256(location: Location, chunk: int = 1 << 22) -> str:
    fs, path = resolve(location)
    digest = hashlib.sha256()
    with _io(location), fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """A local path holding ``location``'s bytes: the file itself when local, a temp copy otherwise."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{display(location)} does not exist")
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="pluristeer-get-") as tmp:
        target = Path(tmp) / (name(location) or "object")
        target.write_bytes(read_bytes(location))
        yield target


@dataclass(frozen=True)
class Written:
    """What :func:`write_file` wrote: where, how many bytes, and their sha256."""

    location: Location
    size: int
    sha256: str


def write_file(target: Location, write: Callable[[str], object]) -> Written:
    """Call ``write(tmp_path)`` on a local temp file, then publish it whole at ``target``: rename onto a
    local path, or one upload to an object store. A failure (or a kill) leaves ``target`` as it was."""
    digest: dict[str, Any] = {}

    def write_and_hash(tmp: str) -> None:
        write(tmp)
        digest["sha256"] = atomic.sha256_file(tmp)
        digest["size"] = os.path.getsize(tmp)

    fs, path = resolve(target)
    if isinstance(fs, pafs.LocalFileSystem):
        written = atomic.atomic_write(path, write_and_hash)
        return Written(written if not is_uri(target) else target, digest["size"], digest["sha256"])
    with tempfile.TemporaryDirectory(prefix="pluristeer-put-") as tmp:
        local = os.path.join(tmp, name(target) or "object")
        write_and_hash(local)
        _upload(local, fs, path, target)
    return Written(target, digest["size"], digest["sha256"])


def _upload(local: str, fs: pafs.FileSystem, path: str, target: Location) -> None:
    """One stream, one ``write`` of the whole (memory-mapped) file, then close: the object appears only when
    the upload completes (a PUT, or a multipart upload that is completed at close)."""
    with _io(target), pa.memory_map(local, "r") as source:
        data = source.read_buffer()
        stream = fs.open_output_stream(path)
        stream.write(data)
        stream.close()


def atomic_write(target: Location, write: Callable[[str], object]) -> Location:
    """:func:`write_file` returning only the location."""
    return write_file(target, write).location


def write_bytes(target: Location, data: bytes) -> Location:
    return atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))


def write_text(target: Location, text: str) -> Location:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: Location, obj: Any) -> Location:
    """``obj`` as indented, key-sorted JSON (the format of :func:`sae.atomic.atomic_write_json`)."""
    return write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def upload_file(local: str | os.PathLike, target: Location) -> Location:
    """Copy the local file ``local`` to ``target`` whole (atomically)."""
    fs, path = resolve(target)
    if isinstance(fs, pafs.LocalFileSystem):
        atomic.atomic_write(path, lambda tmp: shutil.copyfile(local, tmp))
    else:
        _upload(os.fspath(local), fs, path, target)
    return target


__all__ = [
    "Location",
    "S3Options",
    "StorageError",
    "Written",
    "absolute",
    "atomic_write",
    "delete",
    "display",
    "exists",
    "is_file",
    "is_uri",
    "join",
    "listdir",
    "local_copy",
    "local_parent",
    "makedirs",
    "name",
    "read_bytes",
    "read_json",
    "read_text",
    "resolve",
    "sha256",
    "size",
    "upload_file",
    "write_bytes",
    "write_file",
    "write_json",
    "write_text",
]
