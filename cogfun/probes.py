"""The probe cache: what probing a media file found, kept in the shard dir, so that a rerun with
new sources probes only those and `inspect-buckets --shard_dir S --train_data_meta F` probes
nothing it already knows.

`S/probes/*.parquet` (pyarrow; no pickle): one row per probed (file, type), keyed by the file's
identity `(path, size, mtime_ns, kind)` - the resolved path (or URL, or `tar URL#sample key`)
with the size and modification time seen when the sources were listed. A file that changes gets
another size or mtime, so its old row is simply never matched again (it is dropped at the next
compaction) and the file is probed anew. Rows made by a cogfun that read fewer formats
(`cogfun.video.MEDIA_READERS`) are not used either.

What is cached: the probe's MediaInfo, or its MediaError when the error depends on the file's
bytes alone (corrupt, no video stream, zero frames, not a video / not an image, empty file).
Errors that depend on a setting or on the moment (too large: --max_image_pixels; not found,
unreadable, fetch failed) are probed again every run.

Many ranks and nodes: each rank writes the rows it probed to its own part file (a fresh name,
written to a .tmp and renamed: readers see whole files or nothing); after precompute's barrier
rank 0 merges the parts it finds into one file and deletes exactly those parts.

Tar listings (`S/probes/tar-*.json`): for --train_data_shards, what listing a media tar gave
(sample keys, captions, member offsets, skips), named after the tar's identity (URL or path,
size, version, caption key): a rerun asks each tar for its size and version (one HEAD) instead
of fetching and reading it again.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Iterable

PROBES = "probes"
#: MediaError categories that a file's bytes alone decide (cached like a successful probe)
CACHED_ERRORS = frozenset({"corrupt", "no video stream", "zero frames", "not a video", "not an image", "empty file"})
_INFO_FIELDS = ("frames", "fps", "height", "width", "decoder", "stream", "orientation", "note")

Key = tuple  # (path, size, mtime_ns, kind)


class ProbeCache:
    """Cached probe results by key, and the results probed in this process (`new`, to be saved)."""

    def __init__(self, known: dict | None = None):
        self.known: dict[Key, tuple] = known or {}   # key -> (MediaInfo | None, MediaError | None)
        self.new: dict[Key, tuple] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self.known)

    def get(self, key: Key):
        found = self.known.get(key)
        if found is not None:
            self.hits += 1
        return found

    def put(self, key: Key, info, error) -> None:
        if error is None or error.category in CACHED_ERRORS:
            self.new[key] = self.known[key] = (info, error)


def load(where, paths: Iterable[str] | None = None) -> ProbeCache:
    """The cache of a shard dir (local path, URL or ShardStore); `paths`: keep only the rows of
    these files (a rank reads the rows of its slice). An absent dir is an empty cache."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cogfun.storage import as_store
    from cogfun.video import MEDIA_READERS

    store = as_store(where)
    tables = []
    for rel in _parts(store):
        try:
            data = store.read_bytes(rel)
        except FileNotFoundError:   # merged away by another process meanwhile; its rows are in the merge
            continue
        tables.append(pq.read_table(io.BytesIO(data), use_threads=False))
    if not tables:
        return ProbeCache()
    table = pa.concat_tables(tables, promote_options="default")
    table = table.filter(pc.equal(table["media_readers"], MEDIA_READERS))
    if paths is not None:
        table = table.filter(pc.is_in(table["path"], value_set=pa.array(sorted(set(paths)), pa.string())))
    return ProbeCache(_entries(table.to_pydict()))


def _parts(store) -> list[str]:
    """Relative paths of the part files, oldest name first (a merge is named after what it replaces)."""
    if not store.remote:
        folder = Path(store._path(PROBES))
        return sorted(f"{PROBES}/{p.name}" for p in folder.glob("*.parquet")) if folder.is_dir() else []
    try:
        found = store._retrying(PROBES, lambda: store.fs.glob(store._path(f"{PROBES}/*.parquet")))
    except FileNotFoundError:
        return []
    return sorted(f"{PROBES}/{Path(p).name}" for p in found)


def _entries(cols: dict[str, list]) -> dict[Key, tuple]:
    from cogfun.video import MediaError, MediaInfo

    out: dict[Key, tuple] = {}
    keys = zip(cols["path"], cols["size"], cols["mtime_ns"], cols["kind"])
    infos = zip(*(cols[f] for f in _INFO_FIELDS))
    for key, error, category, info in zip(keys, cols["error"], cols["category"], infos):
        if error is not None:
            out[key] = (None, MediaError(error, key[0], category=category))
        else:
            out[key] = (MediaInfo(*info), None)
    return out


def _table(entries: dict[Key, tuple]):
    import pyarrow as pa

    from cogfun.video import MEDIA_READERS

    cols: dict[str, list] = {c: [] for c in ("path", "size", "mtime_ns", "kind", "error", "category",
                                             *_INFO_FIELDS)}
    for (path, size, mtime, kind), (info, error) in sorted(entries.items()):
        for name, value in zip(("path", "size", "mtime_ns", "kind"), (path, size, mtime, kind)):
            cols[name].append(value)
        cols["error"].append(None if error is None else error.reason)
        cols["category"].append(None if error is None else error.category)
        for f in _INFO_FIELDS:
            cols[f].append(None if info is None else getattr(info, f))
    schema = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("kind", pa.string()),
                        ("error", pa.string()), ("category", pa.string()), ("frames", pa.int64()),
                        ("fps", pa.float64()), ("height", pa.int64()), ("width", pa.int64()),
                        ("decoder", pa.string()), ("stream", pa.int64()), ("orientation", pa.int64()),
                        ("note", pa.string())])
    table = pa.table(cols, schema=schema)
    return table.append_column("media_readers", pa.array([MEDIA_READERS] * len(table), pa.int64()))


def _write(folder: Path, name: str, entries: dict[Key, tuple]) -> Path:
    return _write_table(folder, name, _table(entries))


def _write_table(folder: Path, name: str, table) -> Path:
    import pyarrow.parquet as pq

    from cogfun.shards import apply_umask

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = folder / f".{name}.tmp"
    try:
        pq.write_table(table, tmp)
        apply_umask(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def save(shard_dir: str | os.PathLike, cache: ProbeCache) -> Path | None:
    """Write the rows probed in this process (`cache.new`) as a new part file of the local shard
    dir; None when there is nothing new."""
    if not cache.new:
        return None
    return _write(Path(shard_dir) / PROBES, f"part-{uuid.uuid4().hex}.parquet", cache.new)


def merge(shard_dir: str | os.PathLike, keep: Iterable[Key] | None = None) -> int:
    """Merge the part files of a local shard dir into one (after the ranks have written theirs);
    `keep`: only rows with these keys (the current sources' files: rows of changed or removed
    files go). Returns the number of rows kept. (Arrow tables throughout: no Python row objects.)"""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cogfun.video import MEDIA_READERS

    folder = Path(shard_dir) / PROBES
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        return 0
    table = pa.concat_tables([pq.read_table(p, use_threads=False) for p in parts], promote_options="default")
    stored = len(table)
    table = table.filter(pc.equal(table["media_readers"], MEDIA_READERS))
    if keep is not None:
        paths, sizes, mtimes, kinds = zip(*keep) if keep else ((), (), (), ())
        wanted = pa.table({"path": pa.array(paths, pa.string()), "size": pa.array(sizes, pa.int64()),
                           "mtime_ns": pa.array(mtimes, pa.int64()), "kind": pa.array(kinds, pa.string())})
        table = table.join(wanted, keys=["path", "size", "mtime_ns", "kind"], join_type="left semi",
                           use_threads=False)
    # one row per key (two ranks or runs may have probed the same file)
    if len(table.group_by(["path", "size", "mtime_ns", "kind"], use_threads=False).aggregate([])) != len(table):
        table = _unique(table)
    if len(parts) == 1 and len(table) == stored:   # one file already, nothing to drop
        return len(table)
    _write_table(folder, f"merged-{uuid.uuid4().hex}.parquet", table.sort_by("path"))
    for part in parts:
        part.unlink(missing_ok=True)
    return len(table)


def _unique(table):
    """The first row of each key."""
    import pyarrow as pa

    seen, rows = set(), []
    for i, key in enumerate(zip(*(table[c].to_pylist() for c in ("path", "size", "mtime_ns", "kind")))):
        if key not in seen:
            seen.add(key)
            rows.append(i)
    return table.take(pa.array(rows, pa.int64()))


# ---------------------------------------------------------------- tar listings (--train_data_shards)

def listing_name(tar: str, size: int, version: int, caption_key: str) -> str:
    """The file that holds what listing one media tar gave (its samples' keys, captions, member
    offsets, and its skips), named after the tar's identity: a tar that changes gets another name."""
    import hashlib

    from cogfun.video import MEDIA_READERS

    ident = json.dumps([tar, size, version, caption_key, MEDIA_READERS])
    return f"{PROBES}/tar-{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"


def read_listing(where, name: str) -> dict | None:
    """A tar listing of a shard dir (path, URL or ShardStore); None when there is none."""
    from cogfun.storage import as_store

    try:
        return json.loads(as_store(where).read_bytes(name))
    except FileNotFoundError:
        return None


def write_listing(shard_dir: str | os.PathLike, name: str, listing: dict) -> None:
    """Store a tar listing in a local shard dir (atomically: written, then renamed)."""
    from cogfun.shards import write_json_atomic

    path = Path(shard_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, listing)
