"""WebDataset shards: deterministic, atomic tar writing and plain reading helpers.

A shard is an uncompressed POSIX tar in the WebDataset layout: members ``<key>.<ext>``, all members of a
sample adjacent, samples in order. WebDataset splits a member name at the FIRST dot of its basename, so a
key must hold no dot while an extension may (``000001_000002.mask.png`` is key ``000001_000002``, extension
``mask.png``).

The stdlib ``tarfile`` writes the shards rather than ``webdataset.TarWriter``: TarWriter stamps ``time.time()``
unless given ``mtime``, takes no uid/gid, silently ignores its ``format`` argument and writes straight to the
final name. Here every header field is fixed, so the same samples give the same bytes on any machine, and a
shard only appears under its final name once complete and fsynced.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from cgn_dist.errors import UserError
from cgn_dist.storage import open_read, write_bytes_atomic


# Fixed tar header fields: byte-identical shards across machines, users and reruns.
TAR_MTIME = 0
TAR_MODE = 0o444
TAR_FORMAT = tarfile.USTAR_FORMAT  # ASCII names <= 100 chars: no PAX records, which could carry times

TMP_PREFIX = ".tmp-"  # hidden: never matched by shard globs such as "shard-*.tar" or "*.tar"

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_EXT_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


class ShardFormatError(UserError, ValueError):
    """A sample or shard does not follow the WebDataset layout this package writes."""


def damaged_shard(url: str | os.PathLike, what: str) -> ShardFormatError:
    """The one-line error of a reader that meets a truncated or corrupt shard: which file, what is wrong,
    and how to find every damaged shard and make them again."""
    folder = os.path.dirname(str(url)) or "."
    return ShardFormatError(
        f"shard {url} cannot be read: {what}. Check the folder with `cgn-dist verify {folder}`, then rerun the "
        "command that made it (cgn-dist generate / make-shards with the same config: it checks every committed "
        "shard and makes a damaged one again)")


def tar_error_text(e: BaseException) -> str:
    """tarfile's reason without the file object webdataset appends (``unexpected end of data @ <_io...>``)."""
    first = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    return f"{first.split(' @ ')[0] or type(e).__name__} (a truncated or corrupt tar)"


# --- encoding -----------------------------------------------------------------------------------------------

def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays turn up in provenance dicts; JSON has no such types.
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def encode_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces, no NaN): the same dict always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_json_default).encode("ascii")


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of an HxW or HxWxC uint8 array (lossless; deterministic for a given Pillow build)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(_as_uint8_image(image)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an HxW or HxWx3 uint8 array (deterministic for a given Pillow/libjpeg build)."""
    from PIL import Image
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must lie in 1..100, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(_as_uint8_image(image)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _as_uint8_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got dtype {image.dtype}; convert it first, "
                         "e.g. (x.clamp(-1, 1) + 1) * 127.5 rounded, or a per-image min-max rescale")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image array, got shape {image.shape}")
    return image


def encode_value(ext: str, value: Any) -> bytes:
    """Bytes stored for one extension.

    bytes pass through; str is UTF-8; an extension ending in ``json`` takes any JSON value; ``npy`` takes a
    numpy array; ``cls``/``txt``/``id`` take an int. Images must arrive as bytes (use encode_png /
    encode_jpeg): quality and format are the sampler's choice, not the writer's.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    last = ext.rsplit(".", 1)[-1].lower()
    if last == "json":
        return encode_json(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if last == "npy" and isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if last in ("cls", "txt", "id", "index") and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value)).encode("ascii")
    raise ShardFormatError(
        f"cannot store a {type(value).__name__} under extension {ext!r}: give bytes (images via "
        "cgn_dist.data.shards.encode_png / encode_jpeg), a str, a JSON value under a *json extension, a "
        "numpy array under npy, or an int under cls/txt")


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ShardFormatError(f"sample key {key!r} must be non-empty and hold only letters, digits, '_' or "
                               "'-' (a dot would split the key in WebDataset's grouping)")
    return key


def encode_sample(key: str, sample: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The tar members of one sample: ``[(f"{key}.{ext}", bytes)]`` in sorted extension order.

    Keys starting with ``_`` (``__key__``, ``__url__``) are metadata and are not stored.
    """
    check_key(key)
    members = []
    for ext in sorted(sample):
        if ext.startswith("_"):
            continue
        if not _EXT_RE.match(ext):
            raise ShardFormatError(f"extension {ext!r} of sample {key} must be dot-separated words of "
                                   "letters, digits, '_' or '-'")
        members.append((f"{key}.{ext}", encode_value(ext, sample[ext])))
    if not members:
        raise ShardFormatError(f"sample {key} has no data fields")
    return members


# --- writing ------------------------------------------------------------------------------------------------

def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingFile(io.RawIOBase):
    """Write-through file that hashes and counts what goes to disk, so the sha256 costs no second read."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self.f.write(b)
        self.sha.update(memoryview(b)[:n])
        self.nbytes += n
        return n


def temp_path_for(path: Path) -> Path:
    """A unique hidden temporary name beside ``path`` (same directory, so os.replace is atomic)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some file systems refuse fsync on a directory (harmless).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicTarWriter:
    """Writes one shard under a temporary name; ``commit()`` fsyncs and renames it into place.

    Samples may be added batch by batch (memory stays at one batch). Leaving the ``with`` block without
    ``commit()`` (an exception) deletes the temporary file; a killed process leaves it behind, and
    ``remove_temp_files`` cleans it up later.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = temp_path_for(self.path)
        self._file = open(self.tmp, "xb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w|", format=TAR_FORMAT)
        self.keys: list[str] = []
        self.sha256: str | None = None
        self.nbytes: int | None = None

    def add(self, key: str, sample: Mapping[str, Any]) -> None:
        for name, data in encode_sample(key, sample):
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self.keys.append(key)

    def commit(self) -> tuple[str, int]:
        """Finish the tar, fsync, rename to the final name; returns (sha256 hex, size in bytes)."""
        self._tar.close()  # writes the end-of-archive blocks and record padding
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        self.sha256, self.nbytes = self._hashing.sha.hexdigest(), self._hashing.nbytes
        return self.sha256, self.nbytes

    def abort(self) -> None:
        if not self._file.closed:
            try:
                self._tar.close()  # else the tar stream flushes into a closed file when collected
            except (OSError, ValueError, tarfile.TarError):
                pass
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicTarWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.sha256 is None:
            self.abort()


def write_tar(path: str | os.PathLike, samples: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[str, int]:
    """Write ``(key, sample)`` pairs as one atomic, deterministic shard; returns (sha256, size)."""
    with AtomicTarWriter(path) as writer:
        for key, sample in samples:
            writer.add(key, sample)
        return writer.commit()


def json_text(obj: Any, indent: int | None = 2) -> str:
    """The project's JSON files: sorted keys, no NaN, a final newline (the same bytes wherever written)."""
    return json.dumps(obj, sort_keys=True, indent=indent, default=_json_default, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, durable: bool = True) -> None:
    """JSON to a temporary name, fsync, rename: readers see the old file or the whole new one.

    ``durable=False``: no fsync of the file nor of its folder (each is a round trip on NFS); a crash may
    lose the file or leave it torn, so only for files that are safe to lose (see write_bytes_atomic)."""
    path = Path(path)
    write_bytes_atomic(path, json_text(obj, indent).encode("utf-8"), durable=durable)
    if durable:
        _fsync_dir(path.parent)


def remove_temp_files(directory: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Delete leftover temporary files (from killed writers) in ``directory``; returns what was removed.

    ``prefix`` limits it to temporary files of final names starting with that prefix (e.g. "shard-000003").
    Only call this when no writer is working in the directory.
    """
    removed = []
    for p in sorted(Path(directory).glob(f"{TMP_PREFIX}{prefix}*")):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --- reading ------------------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000001_000002.mask.png`` -> (``dir/000001_000002``, ``mask.png``), as WebDataset splits it."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot or not key:
        raise ShardFormatError(f"tar member {name!r} has no '<key>.<ext>' form")
    return (f"{head}/{key}" if head else key), ext


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Samples of a shard as WebDataset groups them: dicts with ``__key__`` and ``ext -> bytes``.

    A plain reader with no decoding and no dependency on webdataset; raises (tarfile.TarError or
    ShardFormatError) on a truncated or malformed tar and on a key that reappears after another key
    (WebDataset would split such a sample in two). The last sample is yielded only once the whole tar
    has been checked.
    """
    try:
        yield from _iter_tar_samples(path)
    except (tarfile.TarError, EOFError) as e:
        raise damaged_shard(path, tar_error_text(e)) from e


def _iter_tar_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    seen: set[str] = set()
    current: dict[str, Any] | None = None
    with open_read(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                if key in seen:
                    raise ShardFormatError(f"{path}: key {key} appears in two separate runs of members")
                seen.add(key)
                current = {"__key__": key}
            if ext in current:
                raise ShardFormatError(f"{path}: sample {key} has extension {ext} twice")
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise damaged_shard(path, f"member {member.name} is truncated")
            current[ext] = data
        # tarfile takes a file cut at a header boundary for a shorter archive: insist on the two zero
        # blocks that end every complete tar.
        f.seek(tar.offset)
        end = f.read(1024)
        if len(end) < 1024 or any(end):
            raise damaged_shard(path, "it is truncated (no end-of-archive marker after the last member)")
    if current is not None:
        yield current


def read_tar_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    return list(iter_tar_samples(path))


def read_sample(path: str | os.PathLike, key: str) -> dict[str, bytes]:
    """The stored bytes of one sample (``ext -> bytes``) from a shard; KeyError if the key is absent."""
    for sample in iter_tar_samples(path):
        if sample["__key__"] == key:
            return {k: v for k, v in sample.items() if not k.startswith("_")}
    raise KeyError(f"sample {key} is not in {path}")
