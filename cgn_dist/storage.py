"""Where outputs live: a local folder (a shared NFS / Lustre mount included) or an object-store prefix
(``s3://bucket/prefix``, ``gs://bucket/prefix``, any URL fsspec knows).

Local folders keep the exact protocol of before (temporary name, fsync, rename). Object stores have no
rename and their listings may lag, but an object appears whole when its upload completes, and a failed or
half-finished multipart upload leaves no object at all. So on a bucket every file is written locally
first and uploaded in one piece, and the commit marker of a shard is uploaded last: it stays the only
proof that a shard is committed. Two writers racing on one name upload the same bytes (every byte derives
from the plan), so last-writer-wins is safe there.

Credentials and endpoints come from the environment as the cloud SDKs read them: ``AWS_ENDPOINT_URL``
(an S3-compatible server), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``;
``GOOGLE_APPLICATION_CREDENTIALS`` for gs://.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import Any

from cgn_dist.errors import InputNotFound, UserError

_HINTS = {
    "s3": "set AWS_ENDPOINT_URL (an S3-compatible server) and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
          "AWS_PROFILE, and check that the bucket exists",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS and check that the bucket exists",
}
_EXTRAS = {"s3": "s3fs", "gs": "gcsfs"}


# What the storage clients read from the environment: handed to Ray workers on other nodes with the job
# (their raylets may have been started without it).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
               "GOOGLE_APPLICATION_CREDENTIALS", "CGN_DIST_STAGING")


def storage_env() -> dict[str, str]:
    """The storage settings of this process's environment (those that are set)."""
    return {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}


class StorageError(UserError, ValueError):
    """An output location cannot be used: wrong bucket, missing credentials, or a missing fsspec backend."""


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URL other than file:// (``s3://b/x``, ``gs://b/x``, ``memory://x``)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(location: str | os.PathLike, *names: str) -> str:
    """A path or URL below ``location``."""
    if is_remote(location):
        return posixpath.join(str(location).rstrip("/"), *names)
    return str(Path(location).joinpath(*names))


def _filesystem(url: str) -> Any:
    import fsspec

    scheme = url.split("://", 1)[0]
    # No listing cache: other processes commit shards, markers and checkpoints while this one runs, and a
    # cached listing taken before they did answers "not found" for an object that is there (the driver's
    # shard-sheet reader opening a shard a worker has just committed failed that way)
    kwargs: dict[str, Any] = {"use_listings_cache": False}
    if scheme == "s3" and os.environ.get("AWS_ENDPOINT_URL"):
        # botocore reads AWS_ENDPOINT_URL too; passing it keeps older stacks right
        kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        return fsspec.filesystem(scheme, **kwargs)
    except (ImportError, ValueError) as e:
        extra = _EXTRAS.get(scheme, f"the fsspec backend for {scheme}://")
        raise StorageError(f"{url}: no storage backend for {scheme}:// ({e}); pip install {extra}") from None


class Store:
    """One output location. Names are relative (``shard-000001.tar``); everything is flat below the root."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        self.remote = is_remote(location)
        self.fs = _filesystem(self.location) if self.remote else None
        self.root = self.location.rstrip("/") if self.remote else str(Path(location))

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def path(self, name: str) -> str:
        return join(self.root, name)

    # --- reading -----------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        if not self.remote:
            return Path(self.path(name)).exists()
        return self._call(self.fs.exists, self.path(name))

    def size(self, name: str) -> int | None:
        """Bytes of ``name``, or None when it does not exist."""
        if not self.remote:
            try:
                return Path(self.path(name)).stat().st_size
            except FileNotFoundError:
                return None
        try:
            return int(self._call(self.fs.info, self.path(name))["size"])
        except FileNotFoundError:
            return None

    def read_bytes(self, name: str) -> bytes | None:
        """The whole object, or None when it does not exist."""
        if not self.remote:
            try:
                return Path(self.path(name)).read_bytes()
            except FileNotFoundError:
                return None
        try:
            return self._call(self.fs.cat_file, self.path(name))
        except FileNotFoundError:
            return None

    def sha256(self, name: str, chunk: int = 1 << 22) -> str:
        sha = hashlib.sha256()
        opener = open if not self.remote else self.fs.open
        with opener(self.path(name), "rb") as f:
            while block := f.read(chunk):
                sha.update(block)
        return sha.hexdigest()

    def _listing(self, pattern: str) -> list[tuple[str, int | None]]:
        """(name, bytes or None for a folder) of what lies directly below the root and matches ``pattern``,
        sorted by name: one listing request per 1,000 objects on a bucket."""
        if not self.remote:
            root = Path(self.root)
            if not root.is_dir():
                return []
            return [(p.name, p.stat().st_size if p.is_file() else None) for p in sorted(root.glob(pattern))]
        try:
            self.fs.invalidate_cache(self.root)  # a listing must see what other writers committed since
            entries = self._call(self.fs.ls, self.root, detail=True)
        except FileNotFoundError:
            return []
        out = {posixpath.basename(e["name"].rstrip("/")): None if e.get("type") == "directory"
               else int(e.get("size") or 0) for e in entries}
        return [(k, out[k]) for k in sorted(out) if fnmatch.fnmatchcase(k, pattern)]

    def sizes(self, pattern: str = "*") -> dict[str, int]:
        """{name: bytes} of the files directly below the root that match ``pattern``: one listing instead
        of a HEAD per object on a bucket."""
        return {name: size for name, size in self._listing(pattern) if size is not None}

    def list(self, pattern: str = "*") -> list[str]:
        """Names (files and folders) directly below the root that match the glob ``pattern``, sorted."""
        return [name for name, _ in self._listing(pattern)]

    def find(self, prefix: str) -> list[str]:
        """Every file below the folder ``prefix`` (recursively), as names relative to the root, sorted."""
        if not self.remote:
            base = Path(self.root)
            return sorted(p.relative_to(base).as_posix() for p in (base / prefix).rglob("*") if p.is_file())
        top = self.path(prefix)
        self.fs.invalidate_cache(top)
        try:
            found = self._call(self.fs.find, top)
        except FileNotFoundError:
            return []
        root = self.root.split("://", 1)[1].rstrip("/") + "/"  # fsspec returns names without the scheme
        return sorted(f.split("://", 1)[-1][len(root):] for f in found)

    # --- writing -----------------------------------------------------------------------------------------
    def makedirs(self) -> None:
        if not self.remote:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        # object stores have no folders: a prefix exists once an object is under it

    def write_bytes(self, name: str, data: bytes) -> None:
        """Readers see the old object or the whole new one (local: temporary name, fsync, rename)."""
        if not self.remote:
            write_bytes_atomic(Path(self.path(name)), data)
            return
        self._call(self.fs.pipe_file, self.path(name), data)

    def put_file(self, local: str | os.PathLike, name: str) -> None:
        """Upload a finished local file as ``name`` in one piece (a partial upload leaves no object)."""
        self._call(self.fs.put_file, str(local), self.path(name))

    def remove(self, name: str) -> None:
        if not self.remote:
            Path(self.path(name)).unlink(missing_ok=True)
            return
        try:
            self._call(self.fs.rm_file, self.path(name))
        except FileNotFoundError:
            pass

    # --- errors --------------------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except PermissionError as e:
            raise self._error(e) from None
        except OSError as e:
            raise self._error(e) from None
        except Exception as e:  # botocore's credential and endpoint errors are no OSError
            if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "google", "gcsfs", "s3fs"):
                raise self._error(e) from None
            raise

    def _error(self, e: BaseException) -> StorageError:
        scheme = self.location.split("://", 1)[0]
        hint = _HINTS.get(scheme, "check the URL and its credentials")
        return StorageError(f"{self.location}: {type(e).__name__}: {e}; {hint}")

    def check_writable(self) -> None:
        """A small probe object written, read back and removed: fails at once on a wrong bucket or missing
        credentials instead of after the first shard."""
        name = f".cgn_dist_probe.{os.getpid()}"
        self.makedirs()
        try:
            self.write_bytes(name, b"ok")
        except FileNotFoundError as e:  # s3fs says so for a bucket that does not exist
            raise self._error(e) from None
        got = self.read_bytes(name)
        self.remove(name)
        if got != b"ok":
            raise StorageError(f"{self.location}: a probe object written there read back as {got!r}")


def write_bytes_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """A local file written under a hidden temporary name, fsynced, renamed: readers see all or nothing.

    ``durable=False`` skips the fsync: readers still see all or nothing, but after a machine crash the file
    may be missing or torn (empty, partial). Only for files whose loss is harmless (a shard's commit marker:
    such a marker reads as not committed and the shard is redone)."""
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def staging_root() -> Path:
    """Where files on their way to an object store are written locally: CGN_DIST_STAGING, else the temp dir."""
    base = Path(os.environ.get("CGN_DIST_STAGING") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return base


def staging_dir(prefix: str = "cgn_dist_stage_") -> Path:
    """A new local folder under ``staging_root()``."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=staging_root()))


def load_json(location: str | os.PathLike, name: str) -> Any:
    data = Store(location).read_bytes(name)
    return None if data is None else json.loads(data)


def read_text(url: str) -> str:
    """A whole small object (an index, a manifest) as text; FileNotFoundError when it does not exist."""
    folder, name = url.rsplit("/", 1)
    data = Store(folder).read_bytes(name)
    if data is None:
        raise InputNotFound(url)
    return data.decode("utf-8")


def open_read(location: str | os.PathLike) -> Any:
    """A binary file object for a local path or an object-store URL."""
    if not is_remote(location):
        return open(location, "rb")
    return _filesystem(str(location)).open(str(location), "rb", block_size=1 << 22)  # 4 MiB: few requests


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    return open_read(url)


def register_stream_schemes() -> None:
    """Let webdataset read shards from object stores through fsspec (it ships no s3:// reader, and reads
    gs:// through the gsutil program). Idempotent."""
    import importlib

    wds_gopen = importlib.import_module("webdataset.gopen")  # the module (the package exports a function of that name)
    wds_gopen.gopen_schemes["s3"] = _gopen_fsspec
    try:
        import gcsfs  # noqa: F401 - only when the gs extra is installed; else webdataset's own gs reader
    except ImportError:
        return
    wds_gopen.gopen_schemes["gs"] = _gopen_fsspec
