"""A shard dir by path or URL: one fsspec code path for a local folder, http(s)://, s3:// and gs://.

Training and inspect-buckets read a shard dir through `ShardStore`; precompute writes to a
local (or shared) filesystem only. A local folder is fsspec's `file` protocol and its files are
used in place. For a remote dir:

- small files (manifest.json, index.parquet, null_prompt.safetensors) are read on every run
  (they change when the dir is precomputed again);
- tars and caption tables (immutable: their names carry the writing run's id) go through a
  per-node read-through cache (`--shard_cache_dir`): each file is fetched once per node and
  shared by every rank and loader thread of the node. A fill holds a lock file (fcntl) and
  downloads to a private partial file that is renamed into place only when complete and of the
  size the manifest records, so concurrent fills neither corrupt nor double-download. The cache
  is bounded (`--shard_cache_size_gb`): after each fill the least recently used complete files
  are evicted (wids' `keep_most_recent_files`; a file in use stays readable through its open
  handle or mapping, as POSIX keeps unlinked open files).
- every remote read retries transient network errors (dropped connections, truncated bodies,
  timeouts, 5xx answers) with exponential backoff; a file that stays unreachable fails the run
  with a `ShardError` naming its URL. Nothing is ever skipped: that would change the data.

S3 and GCS credentials and endpoints come from the usual environment (`AWS_ACCESS_KEY_ID`,
`AWS_ENDPOINT_URL_S3`, `GOOGLE_APPLICATION_CREDENTIALS`, ...), read by s3fs / gcsfs themselves.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard dir that cannot be used as it is; the message says what to do. (Defined here, the
    lowest of the shard modules, so that `cogfun.shards` can read through this one; it is also
    `cogfun.shards.ShardError`.)"""

#: fsspec backends and the pinned package that provides each (gcsfs is not a dependency).
BACKENDS = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
DEFAULT_CACHE_DIR = "~/.cache/cogfun/shards"


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def plain_path(location: str | os.PathLike) -> str:
    """A `file:` location as the plain path fsspec reads for it (`file:///data/s` -> `/data/s`,
    `file://rel/s` -> `rel/s`); any other location unchanged. Precompute (pathlib) and the readers
    (fsspec) resolve a shard dir through this, so both see the same folder."""
    text = str(location)
    for prefix in ("file://", "file:"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


class IncompleteFetch(OSError):
    """A download ended with fewer (or more) bytes than the manifest records."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth a retry: the network, not the request. Missing files and permissions are not."""
    import asyncio

    from fsspec.exceptions import FSTimeoutError

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, asyncio.TimeoutError, FSTimeoutError,
                                         IncompleteFetch]
    try:
        import aiohttp

        errors += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, aiohttp.ClientResponseError]
    except ImportError:
        pass
    try:
        import botocore.exceptions as bex

        errors += [bex.ConnectionError, bex.ReadTimeoutError, bex.ResponseStreamingError, bex.IncompleteReadError]
    except ImportError:
        pass
    return tuple(errors)


def _is_retryable(exc: BaseException) -> bool:
    status = getattr(exc, "status", None)   # aiohttp.ClientResponseError: only server-side trouble
    return status is None or status >= 500 or status in (408, 429)


class ShardStore:
    """Read access to one shard dir (local path or URL). Thread- and process-safe."""

    def __init__(self, location: str | os.PathLike, *, cache_dir: str | None = None, cache_size_gb: float = 100.0,
                 retries: int = 5, backoff: float = 1.0):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.location = plain_path(location).rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.location)
        except (ImportError, ValueError) as exc:
            scheme = self.location.split("://")[0]
            package = BACKENDS.get(scheme)
            hint = (f"install its fsspec backend: pip install {package}" if package else
                    f"supported: a local path, {', '.join(sorted(s + '://' for s in BACKENDS))}")
            raise ShardError(f"--shard_dir {self.location}: cannot read {scheme}:// ({exc}); {hint}") from None
        self.remote = not isinstance(self.fs, LocalFileSystem)
        self.retries, self.backoff = retries, backoff
        self.cache_size = int(cache_size_gb * 1e9)
        root = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
        # one folder per shard dir URL; locks and partial downloads live apart, out of the eviction's view
        self.cache = root / hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self.cache_pattern = str(root / "*" / "*")
        self.locks, self.partial = root / ".locks", root / ".partial"

    def __repr__(self) -> str:
        return f"ShardStore({self.location!r})"

    def url(self, rel: str) -> str:
        return f"{self.location}/{rel}"

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    # ---------------------------------------------------------------- reads with retries

    def _retrying(self, rel: str, fn):
        """fn() with retries on transient errors; a ShardError naming the URL when they run out."""
        if not self.remote:   # a local file has no transient errors (and needs no network client imported)
            return fn()
        errors = _transient_errors()
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except errors as exc:
                if not _is_retryable(exc):
                    raise ShardError(f"{self.url(rel)}: {type(exc).__name__}: {exc}") from exc
                if attempt == self.retries:
                    raise ShardError(f"{self.url(rel)}: unreachable after {attempt + 1} attempts "
                                     f"(last error: {type(exc).__name__}: {exc}). The run stops rather than "
                                     f"train without this file.") from exc
                log.warning("%s: %s (%s); retry %d/%d in %.1f s", self.url(rel), type(exc).__name__, exc,
                            attempt + 1, self.retries, delay)
                time.sleep(delay)
                delay *= 2

    def read_bytes(self, rel: str) -> bytes:
        """The whole file (manifest, index, null prompt: small, never cached). FileNotFoundError if absent."""
        return self._retrying(rel, lambda: self.fs.cat_file(self._path(rel)))

    def read_parquet(self, rel: str, columns: list[str] | None = None, dictionary: tuple[str, ...] = ()):
        """Columns of a parquet file (index.parquet) as a pyarrow Table: only their bytes are read
        (ranged reads from a URL), never cached. Named columns the file lacks are left out; None:
        all of them. `dictionary`: string columns to read as dictionary arrays (few distinct values).
        FileNotFoundError if absent."""
        import pyarrow.parquet as pq

        def read():
            with self.fs.open(self._path(rel), "rb") as fh:
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                if any(c in names for c in dictionary):
                    pf = pq.ParquetFile(fh, metadata=pf.metadata, read_dictionary=[c for c in dictionary if c in names])
                # use_threads=False: once pyarrow's CPU thread pool has run, pyarrow 26 aborts now and then at
                # interpreter exit ("terminate called without an active exception", exit 134, ~1 run in 10
                # here, apache/arrow#39162) after all the work is done; threads buy little on a few columns.
                return pf.read(columns=None if columns is None else [c for c in columns if c in names],
                               use_threads=False)

        return self._retrying(rel, read)

    # ---------------------------------------------------------------- immutable files: local path

    def local_path(self, rel: str, size: int | None = None) -> Path:
        """A local file with the content of `rel`: the file itself for a local dir, else the node's
        cached copy (fetched now when missing). `size`: the byte count the manifest records."""
        if not self.remote:
            return Path(self._path(rel))
        dest = self.cache / quote(rel, safe="")    # flat: the eviction sees files only
        if _fresh(dest, size):
            return dest
        self.cache.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        lock_name = f"{self.cache.name}-{dest.name}"
        with open(self.locks / lock_name, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)   # another rank/thread may be filling it: wait
            if _fresh(dest, size):
                return dest
            part = self.partial / f"{lock_name}.{os.getpid()}.{threading.get_ident()}"
            try:
                self._retrying(rel, lambda: self._download(rel, part, size))
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
        self._evict()
        return dest

    def _download(self, rel: str, part: Path, size: int | None) -> None:
        part.unlink(missing_ok=True)
        self.fs.get_file(self._path(rel), str(part))
        got = part.stat().st_size
        if size is not None and got != size:
            raise IncompleteFetch(f"got {got} bytes, the manifest records {size}")

    def _evict(self) -> None:
        from wids.wids_cleanup import keep_most_recent_files

        keep_most_recent_files(self.cache_pattern, maxsize=self.cache_size, maxfiles=1 << 60)

    def check_cache_fits(self, sizes: dict[str, int]) -> None:
        """Refuse a cache bound smaller than the largest file it must hold (it would thrash forever)."""
        if self.remote and sizes and max(sizes.values()) > self.cache_size:
            rel = max(sizes, key=sizes.get)
            raise ShardError(f"--shard_cache_size_gb {self.cache_size / 1e9:g} is smaller than {self.url(rel)} "
                             f"({sizes[rel] / 1e9:.2f} GB); raise it (a few tars per rank and loader thread "
                             f"is the useful minimum)")


def _fresh(path: Path, size: int | None) -> bool:
    """A complete cached copy (its size as recorded); marks it most recently used."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if size is not None and st.st_size != size:
        return False
    os.utime(path)
    return True


def as_store(where) -> ShardStore:
    """A ShardStore for a store, a local path or a URL (no cache settings: small reads only)."""
    return where if isinstance(where, ShardStore) else ShardStore(where)


def open_store(cfg) -> ShardStore:
    """The training run's shard dir with its cache and retry settings."""
    return ShardStore(cfg.shard_dir, cache_dir=cfg.shard_cache_dir, cache_size_gb=cfg.shard_cache_size_gb,
                      retries=cfg.shard_fetch_retries, backoff=cfg.shard_fetch_backoff)


# ---------------------------------------------------------------- training media from URLs and tars

DEFAULT_MEDIA_CACHE_DIR = "~/.cache/cogfun/media"


class CacheTooSmall(ShardError):
    """--media_cache_size_gb cannot hold a file that must pass through the cache."""


class MediaFetcher:
    """Local copies of training media for the probe and the decoders, which read files.

    A media location is a local path, a URL (http(s)://, s3://, gs://: fetched through fsspec
    into the per-node cache `cache_dir`, with the retries, lock files, partial files and LRU bound
    of `ShardStore`), or a member of a WebDataset tar, `<tar path or URL>#<member>`, whose bytes
    (at a known offset of the tar, itself fetched once per node when remote) are copied into the
    cache as a file of their own. A file that stays unreachable raises ShardError naming its URL
    (the caller skips the source with that reason); a missing one FileNotFoundError.
    """

    def __init__(self, cache_dir: str | None = None, cache_size_gb: float = 100.0, retries: int = 5,
                 backoff: float = 1.0):
        self.cache_dir, self.cache_size_gb = cache_dir or DEFAULT_MEDIA_CACHE_DIR, cache_size_gb
        self.retries, self.backoff = retries, backoff
        self._stores: dict[str, ShardStore] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @classmethod
    def from_config(cls, cfg) -> "MediaFetcher":
        return cls(cfg.media_cache_dir, cfg.media_cache_size_gb, cfg.media_fetch_retries, cfg.media_fetch_backoff)

    def __getstate__(self):   # spawned DataLoader workers: stores (fsspec clients, locks) are made anew there
        return {**self.__dict__, "_stores": {}, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def store(self, url: str) -> tuple[ShardStore, str]:
        """The store of a URL's host or bucket, and the URL's path under it."""
        scheme, _, rest = url.partition("://")
        host, _, rel = rest.partition("/")
        base = f"{scheme}://{host}"
        if self._pid != os.getpid():   # a forked DataLoader worker: fsspec's async clients are not fork-safe
            self._stores, self._lock, self._pid = {}, threading.Lock(), os.getpid()
        with self._lock:
            if base not in self._stores:
                self._stores[base] = ShardStore(base, cache_dir=os.path.expanduser(self.cache_dir),
                                                cache_size_gb=self.cache_size_gb, retries=self.retries,
                                                backoff=self.backoff)
            return self._stores[base], rel

    def stat(self, location: str) -> tuple[int, int]:
        """(size, version) of a URL: the size and a number that changes when the object does
        (its modification time in ns, else a hash of its ETag). FileNotFoundError when absent."""
        store, rel = self.store(location)
        info = store._retrying(rel, lambda: store.fs.info(store._path(rel)))
        return int(info.get("size") or 0), _version(info)

    def read_bytes(self, location: str) -> bytes:
        store, rel = self.store(location)
        return store.read_bytes(rel)

    def check_fits(self, sizes: dict[str, int]) -> None:
        """Refuse a cache bound smaller than the largest file that must pass through it (the file
        would be evicted as soon as it was fetched)."""
        bound = self.cache_size_gb * 1e9
        if sizes and max(sizes.values()) > bound:
            url = max(sizes, key=sizes.get)
            raise CacheTooSmall(f"--media_cache_size_gb {self.cache_size_gb:g} is smaller than {url} "
                                f"({sizes[url] / 1e9:.3g} GB); raise it (a few files per rank and decode worker "
                                f"is the useful minimum)")

    def local(self, location: str, size: int | None = None) -> Path:
        """A local file holding `location` (a path, a URL or `tar#member`; `size`: its byte count)."""
        tar, sep, member = location.partition("#")
        if not sep:
            if not is_url(location):
                return Path(location)
            store, rel = self.store(location)
            return store.local_path(rel, size if size is not None and size >= 0 else None)
        raise ValueError(f"{location}: a tar member needs its offset: use local_member")

    def local_member(self, tar: str, member: str, offset: int, size: int) -> Path:
        """The bytes [offset, offset + size) of `tar` (the member's data) as a cached file."""
        cache = Path(os.path.expanduser(self.cache_dir))
        folder = cache / ("members-" + hashlib.sha256(tar.encode()).hexdigest()[:16])
        dest = folder / quote(member, safe="")
        if _fresh(dest, size):
            return dest
        source = self.local(tar)
        folder.mkdir(parents=True, exist_ok=True)
        part = folder.parent / ".partial" / f"{folder.name}-{dest.name}.{os.getpid()}.{threading.get_ident()}"
        part.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(source, "rb") as src, open(part, "wb") as out:
                data = os.pread(src.fileno(), size, offset)
                if len(data) != size:
                    raise IncompleteFetch(f"{tar}: member {member} ends past the end of the tar")
                out.write(data)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        from wids.wids_cleanup import keep_most_recent_files

        keep_most_recent_files(str(cache / "*" / "*"), maxsize=int(self.cache_size_gb * 1e9), maxfiles=1 << 60)
        return dest


def _version(info: dict) -> int:
    """A number that changes when a remote object does: its modification time (ns) or its ETag's hash."""
    import datetime
    from email.utils import parsedate_to_datetime

    for key in ("mtime", "LastModified", "last_modified", "updated", "Last-Modified"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = parsedate_to_datetime(value)
            except (TypeError, ValueError):
                try:
                    value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
                except ValueError:
                    continue
        if isinstance(value, datetime.datetime):
            return int(value.timestamp() * 1e9)
        return int(float(value) * 1e9)
    for key in ("ETag", "etag", "md5Hash", "Content-MD5"):
        if info.get(key):
            return int(hashlib.sha256(str(info[key]).encode()).hexdigest()[:15], 16)
    return 0
