"""The shard dir: the data contract between precompute and train (DESIGN §4).

    S/manifest.json          written last, atomically: the commit marker
    S/<bucket>/<rank>-<run>-<n>.tar   webdataset tars, one bucket per tar, .tmp until complete
    S/prompts/<rank>-<run>-<n>.safetensors   caption table: one T5 embedding per distinct caption,
                             keyed by `prompt_key(caption)`, .tmp until complete
    S/index.parquet          one row per sample (key, bucket, shard, position, source, ..., prompt,
                             prompt_table, and where its bytes are: tar member and caption
                             embedding offsets and sizes)
    S/null_prompt.safetensors  the empty-caption T5 embedding
    S/black_latents.safetensors  inpaint: per bucket, the latents of an all -1 clip (the reference's
                             t2v_flag steps)
    S/.precompute.json       the settings+model fingerprint of the run that is filling S

A sample is `<key>.json` (metadata: source, caption, `prompt` = its caption table key, view,
frame indices, fps, resize/crop, bucket sizes, and `input`, the digest of the source it was made
from) + `<key>.safetensors` (bf16 latents). Format 2 stores the T5 embedding once per caption
(format 1 stored it in every sample). Nothing here unpickles: a member with any other extension
is refused. Readers take a local path or a `storage.ShardStore` (URLs); training reads the index
through `SampleIndex` (columnar, lazy).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from cogfun.storage import ShardError, as_store

FORMAT_VERSION = 2                  # 2: T5 embeddings in caption tables (1: one per sample)
MANIFEST = "manifest.json"
INDEX = "index.parquet"
NULL_PROMPT = "null_prompt.safetensors"
PROMPTS = "prompts"                 # caption tables
BLACK_LATENTS = "black_latents.safetensors"  # inpaint: per bucket, the latents of an all -1 clip
INTENT = ".precompute.json"
HASH_CACHE = ".model-hash-cache.json"
ALLOWED_MEMBERS = ("json", "safetensors")


# ---------------------------------------------------------------- one sample

def encode_sample(key: str, meta: dict, tensors: dict) -> dict:
    """A webdataset sample dict: json metadata + one safetensors blob."""
    from safetensors.torch import save

    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain dots")
    blob = save({k: v.contiguous() for k, v in tensors.items()})
    return {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode(), "safetensors": blob}


def decode_sample(sample: dict) -> tuple[dict, dict]:
    """(meta, tensors) of a sample as the webdataset package reads our tars back (member bytes by
    extension): the round-trip check that the tars are plain webdataset. Refuses any other member."""
    import torch

    check_members(sample.get("__key__"), [k for k in sample if not k.startswith("__")])
    meta = json.loads(sample["json"])
    blob = torch.frombuffer(bytearray(sample["safetensors"]), dtype=torch.uint8)
    return meta, tensors_in(blob, safetensors_header(blob.numpy()))


def check_members(key, extensions) -> None:
    extra = [k for k in extensions if k not in ALLOWED_MEMBERS]
    if extra:
        raise ShardError(f"sample {key!r} has member(s) {extra}: only .json and "
                         f".safetensors are read (nothing is ever unpickled)")


# safetensors layout (its documented format): u64 little-endian header length N, N bytes of JSON
# {name: {dtype, shape, data_offsets: [begin, end]}}, then the data. Parsed here so that tensors can
# be views of one buffer read straight from the tar (safetensors' `load(bytes)` copies each tensor).
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_header(head) -> tuple[int, dict]:
    """(offset of the data, {name: (dtype, shape, begin, end)}) from a safetensors blob's leading
    bytes (at least 8 + header length of them)."""
    n = int.from_bytes(bytes(head[:8]), "little")
    if len(head) < 8 + n:
        raise ValueError(f"need {8 + n} leading bytes, got {len(head)}")
    header = json.loads(bytes(head[8:8 + n]))
    header.pop("__metadata__", None)
    entries = {}
    for name, e in header.items():
        if e["dtype"] not in SAFETENSORS_DTYPES:
            raise ShardError(f"tensor {name!r}: unsupported safetensors dtype {e['dtype']}")
        entries[name] = (SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"])
    return 8 + n, entries


def file_safetensors_header(fd: int) -> tuple[int, dict]:
    """`safetensors_header` of a safetensors file open as `fd` (reads the header only)."""
    head = os.pread(fd, 8, 0)
    return safetensors_header(head + os.pread(fd, int.from_bytes(head, "little"), 8))


def tensors_in(buf, header: tuple[int, dict]) -> dict:
    """Tensors viewing `buf` (a uint8 tensor holding the blob from its start), no copies."""
    import torch

    start, entries = header
    out = {}
    for name in entries:
        dtype, shape, begin, end = entries[name]
        out[name] = buf[start + begin:start + end].view(getattr(torch, dtype)).view(shape)
    return out


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, atomically: written to `<path>.tmp` (removed on failure) and renamed
    into place, so `path` is either absent, the old file or the whole new one. I/O failures (disk
    full, permissions) are raised as OSError: safetensors raises its own SafetensorError, which the
    CLI would show as a traceback. `metadata` (the header's `__metadata__`) is written in sorted
    key order, so identical inputs give identical bytes (see `sort_header_metadata`)."""
    import re

    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata:
            sort_header_metadata(tmp)
        apply_umask(tmp)  # safetensors writes 0600 files
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)   # e.g. disk full: no partial file left behind
        found = re.search(r"os error (\d+)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def sort_header_metadata(file: Path) -> None:
    """Rewrite, in place, a safetensors file's `__metadata__` in sorted key order.

    safetensors keeps the metadata in a hash map whose order changes from process to process, so two
    identical runs would write different bytes. The header keeps its length (the same JSON, other
    order, padded with spaces as safetensors pads it), so the tensor data does not move."""
    with open(file, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) > size:
            raise RuntimeError(f"{file}: the sorted safetensors header is longer ({len(text)} bytes) than "
                               f"the written one ({size}); cannot sort it in place")
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))


def user_umask() -> int:
    """This process's umask, read without changing it where /proc allows (os.umask can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: Path) -> None:
    """Give `path` (a file, or a folder and everything under it) the permissions the user's umask
    allows: 0666 & ~umask for files, 0777 & ~umask for folders.

    safetensors (and `tempfile.mkstemp`) create 0600 files whatever the umask, so a LoRA or a
    checkpoint written by the training account would be unreadable to a ComfyUI or inference
    server running as another account. Call it on a file before it is renamed into place.
    """
    mask = user_umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# ---------------------------------------------------------------- writing tars

class BucketWriters:
    """One open tar per bucket for this rank; a tar is `.tmp` until it is complete, then renamed."""

    def __init__(self, shard_dir: Path, rank: int, run_id: str, max_samples: int):
        self.shard_dir, self.rank, self.run_id, self.max_samples = Path(shard_dir), rank, run_id, max_samples
        self.open: dict[str, tuple] = {}   # bucket -> (TarWriter, tmp path, final path, count)
        self.serial = 0
        self.done: list[Path] = []
        self.bytes_written = 0

    def write(self, bucket: str, sample: dict) -> None:
        import webdataset as wds

        if bucket not in self.open:
            folder = self.shard_dir / bucket
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / f"{self.rank:03d}-{self.run_id}-{self.serial:05d}.tar"
            self.serial += 1
            tmp = final.with_name(final.name + ".tmp")
            self.open[bucket] = [wds.TarWriter(str(tmp)), tmp, final, 0]
        entry = self.open[bucket]
        entry[0].write(sample)
        entry[3] += 1
        if entry[3] >= self.max_samples:
            self._finish(bucket)

    def _finish(self, bucket: str) -> None:
        writer, tmp, final, _ = self.open.pop(bucket)
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self.bytes_written += final.stat().st_size
        self.done.append(final)

    def close(self) -> None:
        try:
            for bucket in list(self.open):
                self._finish(bucket)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """After a failure (disk full, a crash while encoding): close the unfinished tars without
        flushing anything more and delete them. Left to the garbage collector, tarfile would retry
        the writes at exit and print 'Exception ignored' tracebacks after the real error."""
        for writer, tmp, _, _ in self.open.values():
            for close in (writer.tarstream.fileobj.close, getattr(writer.own_fileobj, "close", None)):
                try:
                    if close is not None:
                        close()
                except (OSError, ValueError):
                    pass
            writer.tarstream.closed = True
            writer.own_fileobj = None
            tmp.unlink(missing_ok=True)
        self.open.clear()


def remove_partial(shard_dir: Path) -> list[Path]:
    """Delete `.tmp` leftovers (tars, caption tables) of an interrupted run (never complete, never listed).

    Call before any rank of the new run starts writing."""
    removed = []
    for pattern in ("*/*.tar.tmp", "*.tmp", f"{PROMPTS}/*.tmp"):
        for p in Path(shard_dir).glob(pattern):
            p.unlink()
            removed.append(p)
    return removed


def remove_stale(shard_dir: Path, rows: list["ShardRow"], inputs: dict[str, str],
                 keep: set[str] = frozenset()) -> set[str]:
    """Delete complete tars (other than the committed ones in `keep`) holding a sample whose source
    (its identity: file_path, or file_path#k for a caption variant; `inputs` is keyed by it) is no
    longer an input or has changed (size, mtime, caption) since it was written: the leftovers
    of an interrupted run must not be trusted blindly. Their other samples are simply encoded again.

    `rows` is what `scan_shards` found; returns the relative paths of the tars removed."""
    stale = {r.shard for r in rows
             if r.shard not in keep and inputs.get(r.meta.get("identity", r.meta.get("source"))) != r.meta.get("input")}
    for rel in stale:
        (Path(shard_dir) / rel).unlink()
    return stale


def keep_only(shard_dir: Path, rows: list["ShardRow"], keep: set[tuple[str, int]], run_id: str) -> int:
    """Delete every sample of `rows` but those in `keep` ((tar, position) pairs): a tar holding only
    kept samples stays as it is, one holding none is deleted, one holding both has its kept samples'
    members copied, bytes unchanged, into new tars (`<bucket>/000-<run_id>-<n>.tar`) before it is
    deleted. Bucket folders left empty are removed. Returns the number of samples deleted."""
    shard_dir = Path(shard_dir)
    by_tar: dict[str, list[ShardRow]] = {}
    for r in rows:
        by_tar.setdefault(r.shard, []).append(r)
    writers = BucketWriters(shard_dir, 0, run_id, max_samples=1 << 30)
    dropped = 0
    try:
        for rel, tar_rows in sorted(by_tar.items()):
            kept = {r.key: r.bucket for r in tar_rows if (r.shard, r.position) in keep}
            if len(kept) == len(tar_rows):
                continue
            dropped += len(tar_rows) - len(kept)
            if kept:
                members: dict[str, dict] = {}
                with tarfile.open(shard_dir / rel, mode="r:") as tf:
                    for member in tf:
                        key, _, ext = member.name.partition(".")
                        if key in kept:
                            members.setdefault(key, {"__key__": key})[ext] = tf.extractfile(member).read()
                for key, sample in members.items():
                    writers.write(kept[key], sample)
            writers.close()   # the copies are complete before the original goes
            (shard_dir / rel).unlink()
    except BaseException:
        writers.abort()
        raise
    for folder in shard_dir.iterdir():
        if folder.is_dir() and folder.name != PROMPTS and not any(folder.iterdir()):
            folder.rmdir()
    return dropped


# ---------------------------------------------------------------- reading what is on disk

@dataclass
class ShardRow:
    key: str
    bucket: str
    shard: str        # path relative to the shard dir
    position: int     # sample position inside the tar
    meta: dict
    members: dict = field(default_factory=dict)   # extension -> (data offset in the tar, size)


def scan_tar(path: Path, rel: str) -> list[ShardRow]:
    """Rows of one complete tar from its .json members (tensors are skipped over, not read)."""
    rows = []
    with tarfile.open(path, mode="r:") as tf:
        seen: dict[str, int] = {}
        members: dict[str, dict] = {}
        for member in tf:
            key, _, ext = member.name.partition(".")
            if key not in seen:
                seen[key] = len(seen)
                members[key] = {}
            members[key][ext] = (member.offset_data, member.size)
            if ext != "json":
                continue
            meta = json.loads(tf.extractfile(member).read())
            rows.append(ShardRow(key=key, bucket=meta["bucket"], shard=rel, position=seen[key], meta=meta,
                                 members=members[key]))
    return rows


def scan_shards(shard_dir: Path, skip: set[str] = frozenset()) -> list[ShardRow]:
    """Every sample of every complete tar in the shard dir (but the tars named in `skip`)."""
    shard_dir = Path(shard_dir)
    rows: list[ShardRow] = []
    for path in sorted(shard_dir.glob("*/*.tar")):
        rel = str(path.relative_to(shard_dir))
        if rel not in skip:
            rows.extend(scan_tar(path, rel))
    return rows


def rows_from_index(shard_dir: Path, committed: dict[str, int]) -> list[ShardRow]:
    """The samples of a finished shard dir's tars (`committed`: the manifest's {tar: samples}) as
    its index.parquet lists them (its columns as `meta`), without reading the tars: an incremental
    run knows what is on disk at the cost of one parquet read, not a scan of every tar."""
    cols = read_index(shard_dir)
    if not all(c in cols for c in LOCATION_COLUMNS):   # an index from before they were recorded
        tars = {str(p.relative_to(shard_dir)) for p in Path(shard_dir).glob("*/*.tar")}
        return scan_shards(shard_dir, skip=tars - set(committed))
    meta_cols = [c for c in cols if c not in ROW_FIELDS and c not in LOCATION_COLUMNS]
    rows = [ShardRow(key=k, bucket=b, shard=t, position=p, meta={c: cols[c][i] for c in meta_cols},
                     members={"json": (cols["json_offset"][i], cols["json_size"][i]),
                              "safetensors": (cols["tensors_offset"][i], cols["tensors_size"][i])})
            for i, (k, b, t, p) in enumerate(zip(cols["key"], cols["bucket"], cols["shard"], cols["position"]))]
    gone = [t for t in committed if not (Path(shard_dir) / t).is_file()]
    if gone:
        raise ShardError(f"{shard_dir}: the manifest lists {len(gone)} tar(s) that are gone (e.g. {gone[0]}); "
                         f"re-run with --overwrite to rebuild the shard dir")
    listed = {r.shard for r in rows}
    if listed != set(committed):
        raise ShardError(f"{shard_dir}: {INDEX} lists the tars {sorted(listed ^ set(committed))[:3]} differently "
                         f"from {MANIFEST}; re-run with --overwrite to rebuild the shard dir")
    return rows


def tar_sample_counts(shard_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in sorted(Path(shard_dir).glob("*/*.tar")):
        with tarfile.open(path, mode="r:") as tf:
            counts[str(path.relative_to(shard_dir))] = len({m.name.partition(".")[0] for m in tf})
    return counts


# ---------------------------------------------------------------- index + manifest

ROW_FIELDS = ("key", "bucket", "shard", "position")     # from the ShardRow; the rest from the sample json
# Where a sample's bytes are, recorded at precompute so that readers never scan tar headers: its two tar
# members' data (offset, size) and its caption embedding's in its caption table. An index written before
# them (same format version) is still read: the loader then scans a tar's headers when it first opens it.
LOCATION_COLUMNS = ("json_offset", "json_size", "tensors_offset", "tensors_size", "prompt_offset", "prompt_size")
INDEX_COLUMNS = ("key", "bucket", "shard", "position", "source", "caption", "kind", "frames",
                 "height", "width", "latent_frames", "tokens", "view", "prompt", "prompt_table", *LOCATION_COLUMNS)
PROMPT_LAYOUT = b"cogfun.prompt_embeds"   # index.parquet metadata: {dtype, shape} of every caption embedding


def write_index(shard_dir: Path, rows: list[ShardRow], prompt_tables: dict[str, str]) -> None:
    """index.parquet; `prompt_tables`: caption key -> the caption table holding it (its header gives
    the embedding's offset and size). `rows` come from `scan_shards` (their tar member offsets)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: (r.bucket, r.shard, r.position))
    meta_columns = INDEX_COLUMNS[:INDEX_COLUMNS.index("prompt_table")]
    cols = {c: [getattr(r, c) if c in ROW_FIELDS else r.meta[c] for r in rows] for c in meta_columns}
    cols["prompt_table"] = [prompt_tables[k] for k in cols["prompt"]]
    for ext, name in (("json", "json"), ("safetensors", "tensors")):
        cols[f"{name}_offset"] = [r.members[ext][0] for r in rows]
        cols[f"{name}_size"] = [r.members[ext][1] for r in rows]
    spans, layouts = {}, set()
    for rel in sorted(set(cols["prompt_table"])):
        with open(Path(shard_dir) / rel, "rb") as fh:
            start, entries = file_safetensors_header(fh.fileno())
        for key, (dtype, shape, begin, end) in entries.items():
            if prompt_tables.get(key) == rel:
                spans[key] = (start + begin, end - begin)
                layouts.add((dtype, shape))
    if len(layouts) > 1:
        raise ShardError(f"{shard_dir}: caption embeddings of different dtypes or shapes {sorted(layouts)}: "
                         f"one text encoder made them all? Re-run precompute with --overwrite")
    cols["prompt_offset"] = [spans[k][0] for k in cols["prompt"]]
    cols["prompt_size"] = [spans[k][1] for k in cols["prompt"]]
    table = pa.table(cols)
    if layouts:
        (dtype, shape), = layouts
        table = table.replace_schema_metadata({PROMPT_LAYOUT: json.dumps({"dtype": dtype, "shape": list(shape)})})
    tmp = Path(shard_dir) / (INDEX + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, Path(shard_dir) / INDEX)


def read_index(where, columns=None) -> dict[str, list]:
    """index.parquet of a shard dir (path, URL or ShardStore) as {column: values} (Python lists: for
    tools and tests; training reads it through `SampleIndex`)."""
    return as_store(where).read_parquet(INDEX, columns).to_pydict()


class SampleIndex:
    """index.parquet for training: columnar and lazy (~130 bytes per sample held for training).

    A column is read from the file the first time it is asked for (only its bytes: ranged reads
    from a URL; `fetch` reads several in one go) and held as a numpy array: integers as int64,
    strings as int32 codes into their distinct values in sorted order (`codes`), but `key`, held
    as an Arrow array and as `clip` codes (the key without `_v<view>`, see `buckets.sample_key`).
    Captions, sources and the other columns stay in the file until a caller asks for them. Not for
    concurrent first reads: fetch what threads will use before starting them.
    """

    def __init__(self, where=None, *, table=None):
        """`where`: a shard dir (path, URL or ShardStore); or `table`: the index as a pyarrow Table."""
        self.store = as_store(where) if table is None else None
        self._table = table
        self._held: dict[str, object] = {}
        self._absent: set[str] = set()
        self.prompt_layout: tuple[str, tuple] | None = None   # (torch dtype name, shape) of caption embeddings

    def __repr__(self) -> str:
        return f"SampleIndex({self.store or 'table'}, held: {sorted(self._held)})"

    def fetch(self, names) -> None:
        """Read the columns `names` that are not held yet, in one read. A column the file lacks is
        remembered as absent (`has`)."""
        import pyarrow as pa

        wanted = [n for n in dict.fromkeys(names) if n not in self._held and n not in self._absent]
        if not wanted:
            return
        if self._table is not None:
            table = self._table.select([n for n in wanted if n in self._table.column_names])
            metadata = self._table.schema.metadata
        else:
            table = self.store.read_parquet(INDEX, wanted, dictionary=tuple(n for n in wanted if n != "key"))
            metadata = table.schema.metadata
        if metadata and PROMPT_LAYOUT in metadata:
            layout = json.loads(metadata[PROMPT_LAYOUT])
            self.prompt_layout = (layout["dtype"], tuple(layout["shape"]))
        for name in wanted:
            if name not in table.column_names:
                self._absent.add(name)
                continue
            column = table.column(name)
            if column.null_count:
                raise ShardError(f"{self._where()}: column {name!r} has {column.null_count} empty values; "
                                 f"re-run precompute to rewrite it")
            if name == "key":   # the keys themselves (to check what is read), and the clips
                import pyarrow.compute as pc

                self._held["key"] = column.combine_chunks()
                self._held["clip"] = _sorted_codes(pc.replace_substring_regex(column, pattern=r"_v[0-9]+$",
                                                                              replacement=""))
            elif pa.types.is_integer(column.type):
                self._held[name] = column.to_numpy().astype("int64", copy=False)
            else:
                self._held[name] = _sorted_codes(column)
            del column
        del table
        pa.default_memory_pool().release_unused()   # what the read needed only: give it back now

    def has(self, name: str) -> bool:
        self.fetch([name])
        return name in self._held

    def ints(self, name: str):
        """An integer column as an int64 array (one entry per row)."""
        return self._get(name)

    def codes(self, name: str):
        """(int32 codes, pyarrow array of the distinct values in sorted order) of a string column, or
        of `clip`: the sample keys without their view suffix."""
        self._get("key" if name == "clip" else name)
        return self._held[name]

    def keys(self):
        """The sample keys (a pyarrow string array, one per row)."""
        return self._get("key")

    def _get(self, name: str):
        self.fetch([name])
        if name not in self._held:
            raise ShardError(f"{self._where()}: no column {name!r} (written by an older cogfun?); re-run "
                             f"precompute with --overwrite to rebuild it")
        return self._held[name]

    def _where(self) -> str:
        return self.store.url(INDEX) if self.store is not None else INDEX


def _sorted_codes(column):
    """(int32 codes, sorted distinct values) of a pyarrow string column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    order = pc.sort_indices(arr.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[arr.indices.to_numpy(zero_copy_only=False)], arr.dictionary.take(order)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(where, *, check_version: bool = True) -> dict | None:
    """manifest.json of a shard dir (path, URL or ShardStore); None when there is none."""
    from cogfun.storage import as_store

    store = as_store(where)
    try:
        data = json.loads(store.read_bytes(MANIFEST))
    except FileNotFoundError:
        return None
    version = data.get("format_version")
    if check_version and version != FORMAT_VERSION:
        why = (" (format 1 stored the T5 embedding in every sample; format 2 stores it once per caption)"
               if version == 1 else "")
        raise ShardError(f"{store.url(MANIFEST)}: shard format version {version}, but this cogfun reads "
                         f"{FORMAT_VERSION}{why}. Re-run `cogfun precompute` with --overwrite on the source "
                         f"data to rebuild it (or use the cogfun version that wrote it).")
    return data


def require_manifest(where) -> dict:
    manifest = read_manifest(where)
    if manifest is None:
        raise ShardError(f"{where}: no {MANIFEST}; it is not a finished precompute output "
                         f"(run `cogfun precompute` into it, or point --shard_dir at a finished one)")
    return manifest


# ---------------------------------------------------------------- caption tables

def prompt_key(caption: str) -> str:
    """The caption table key of a caption (content-addressed: equal captions share one embedding)."""
    return hashlib.sha256(caption.encode()).hexdigest()[:32]


def prompt_tables_on_disk(shard_dir: Path) -> dict[str, str]:
    """caption key -> table (relative path) for every complete caption table (headers only)."""
    found: dict[str, str] = {}
    for path in sorted((Path(shard_dir) / PROMPTS).glob("*.safetensors")):
        with open(path, "rb") as fh:
            _, entries = file_safetensors_header(fh.fileno())
        rel = str(path.relative_to(shard_dir))
        for key in entries:
            found.setdefault(key, rel)
    return found


# ---------------------------------------------------------------- fingerprint

def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_parts(settings: dict, model: dict, inputs: dict[str, str]) -> dict:
    """What the shard bytes depend on. Model path is recorded but not hashed (moving a model
    folder does not change its weights)."""
    model_hashed = {k: v for k, v in model.items() if k != "path"}
    return {"format_version": FORMAT_VERSION, "settings": settings, "model": model_hashed,
            "inputs": digest(sorted(inputs.items()))}


def fingerprint(parts: dict) -> str:
    return digest(parts)


def describe_differences(old: dict, new: dict) -> list[str]:
    """Human lines: which fingerprint keys differ between two fingerprint_parts dicts."""
    lines = []
    if old.get("format_version") != new.get("format_version"):
        lines.append(f"format_version: {old.get('format_version')} -> {new.get('format_version')}")
    for group in ("settings", "model"):
        a, b = old.get(group, {}), new.get(group, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                lines.append(f"{group}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return lines


def input_changes(old_inputs: dict[str, str], new_inputs: dict[str, str]) -> tuple[list, list, list]:
    """(added, removed, changed) source identities (file_path, or file_path#k for caption variant k)."""
    added = sorted(set(new_inputs) - set(old_inputs))
    removed = sorted(set(old_inputs) - set(new_inputs))
    changed = sorted(k for k in set(old_inputs) & set(new_inputs) if old_inputs[k] != new_inputs[k])
    return added, removed, changed
