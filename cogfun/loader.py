"""Reading cached shards for training: indexed random access + a seeded bucket batch sampler.

Why this shape (DESIGN §5 (b)) rather than a streaming pipeline: a batch must hold one bucket,
and resume must be exact. With a map-style dataset over the tars (each sample's member offsets
recorded in index.parquet at precompute) and a batch sampler that is a pure function of (seed,
epoch, index), the data position is just "how many batches of this epoch were consumed": a
resumed run skips that many batches of the epoch's plan and reads nothing of them.

At scale (millions of samples, 8 ranks a node) every rank holds the index: it is held as arrays
(`shards.SampleIndex`, `Rows`, the sampler's arrays and the current epoch's plan, ~190 bytes per
sample in all), captions and paths stay in the file, and reading ahead is bounded (2 x threads
batches).

Reading a sample is one `pread` of its safetensors member into a fresh buffer, of which the
tensors are views (no further copy), plus one of its caption's T5 embedding from the caption
table. That work releases the GIL, so `batches()` runs it in threads of the training process:
worker processes would have to move every batch through shared memory, which cost 5-8x the read
itself (bench/streaming.py). A remote shard dir's tars come through the node's cache
(`storage.ShardStore.local_path`), fetched by the reading thread the first time a tar is used.

Global batch order: per epoch, one view of each clip is taken (cycling through a clip's views
across epochs, see `BucketBatchSampler`), each bucket's samples are shuffled (videos repeated
`video_repeat` times), cut into batches of `batch_size`, and all batches are shuffled together
(so buckets mix in proportion to their size). Global batch g goes to rank g % world; a step of
W ranks x A accumulation micro-batches consumes W*A consecutive global batches. The same global
batches, in the same order, reach one process with accumulation W*A: runs on different world
sizes train on the same data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cogfun import shards
from cogfun.config import ConfigError
from cogfun.storage import ShardStore, as_store


class _LocalFile:
    """A local file read with pread (thread-safe, GIL released); closed when the last user drops it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)

    def read_into(self, offset: int, size: int):
        """A fresh uint8 tensor of `size` bytes from `offset`."""
        import torch

        buf = torch.empty(size, dtype=torch.uint8)
        got = os.preadv(self.fd, [buf.numpy()], offset) if size else 0
        if got != size:
            raise shards.ShardError(f"{self.path}: short read at {offset} ({got} of {size} bytes): truncated file?")
        return buf


# what the sampler and the reader use of index.parquet, read in one go (captions, sources stay in the file)
LEAN_COLUMNS = ("shard", "position", "bucket", "kind", "key", "view", "prompt_table", *shards.LOCATION_COLUMNS)


class CachedSamples:
    """Map-style dataset over the manifest's tars. Item = (global index, batch id) -> sample dict.

    A sample is found through the index (`shards.SampleIndex`): its tar members' and its caption
    embedding's offsets and sizes, recorded at precompute, so reading it is three preads and no
    tar header is ever scanned. An index written before those offsets were recorded is read too:
    a tar's (caption table's) headers are then scanned when it is first opened."""

    def __init__(self, store: ShardStore | str | Path, manifest: dict, index: shards.SampleIndex | dict | None = None,
                 open_files: int = 64):
        """`index`: the shard dir's index (read from the store when first needed); a dict of
        columns is taken as the index's content."""
        self.store = as_store(store)
        self.shards = sorted(manifest["shards"])           # relative paths
        self.counts = [manifest["shards"][s] for s in self.shards]
        self.sizes = {**manifest.get("shard_bytes", {}), **manifest.get("prompt_tables", {})}
        self.offsets = {}
        self.starts = []
        total = 0
        for s, n in zip(self.shards, self.counts):
            self.offsets[s] = total
            self.starts.append(total)
            total += n
        self.total = total
        if isinstance(index, dict):
            import pyarrow as pa

            index = shards.SampleIndex(table=pa.table(index))
        self._index = index
        self._gidx = None        # global index of each index row
        self._reader = None      # what __getitem__ reads from, built on first use
        self.open_files = open_files
        self._open: OrderedDict[str, _LocalFile] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def index(self) -> shards.SampleIndex:
        if self._index is None:
            self._index = shards.SampleIndex(self.store)
            self._index.fetch(LEAN_COLUMNS)
        return self._index

    def global_index(self, shard: str, position: int) -> int:
        return self.offsets[shard] + position

    def global_indices(self):
        """The global index of each index row (int64 array, in the index's row order)."""
        import numpy as np

        if self._gidx is None:
            codes, names = self.index.codes("shard")
            unknown = [s for s in names.to_pylist() if s not in self.offsets]
            if unknown:
                raise shards.ShardError(f"{self.store.url(shards.INDEX)} lists {unknown[0]}, which the manifest does "
                                        f"not: the index and the manifest disagree; re-run precompute")
            starts = np.array([self.offsets[s] for s in names.to_pylist()], dtype=np.int64)
            self._gidx = starts[codes] + self.index.ints("position")
        return self._gidx

    def locate(self, index: int) -> tuple[str, int]:
        import bisect

        i = bisect.bisect_right(self.starts, index) - 1
        return self.shards[i], index - self.starts[i]

    def _file(self, rel: str):
        """The open file `rel` (fetched into the node cache first when remote); a bounded LRU.
        Dropped files close once no reading thread holds them."""
        with self._lock:
            f = self._open.get(rel)
            if f is not None:
                self._open.move_to_end(rel)
                return f
        try:
            f = _LocalFile(self.store.local_path(rel, self.sizes.get(rel)))
        except FileNotFoundError:
            if not self.store.remote:
                raise
            # evicted by another process of the node between its fetch and our open: fetch again
            f = _LocalFile(self.store.local_path(rel, self.sizes.get(rel)))
        with self._lock:
            f = self._open.setdefault(rel, f)
            while len(self._open) > self.open_files:
                self._open.popitem(last=False)
        return f

    def __len__(self) -> int:
        return self.total

    def _prepare(self) -> dict:
        """The arrays __getitem__ reads (built under the lock: reading threads may ask first)."""
        import numpy as np

        if self._reader is not None:   # built: no lock per sample
            return self._reader
        with self._lock:
            if self._reader is not None:
                return self._reader
            idx = self.index
            idx.fetch(LEAN_COLUMNS)
            row_of = np.full(self.total, -1, dtype=np.int64)
            row_of[self.global_indices()] = np.arange(len(self.global_indices()))
            tables, table_names = idx.codes("prompt_table")
            if all(idx.has(c) for c in shards.LOCATION_COLUMNS):
                where = [idx.ints(c) for c in shards.LOCATION_COLUMNS]
                scanned = None
            else:   # an index written before the offsets: each tar / caption table is scanned when first used
                where = [np.full(len(tables), -1, dtype=np.int64) for _ in shards.LOCATION_COLUMNS]
                scanned = set()
            self._reader = {"row_of": row_of, "where": where, "tables": tables, "keys": idx.keys(),
                            "table_names": table_names.to_pylist(), "scanned": scanned}
            return self._reader

    def _locations(self, row: int, shard: str, table: str) -> tuple[int, ...]:
        """(json offset, json size, tensors offset, tensors size, prompt offset, prompt size) of a row."""
        r = self._reader
        if r["scanned"] is not None:
            with self._lock:
                for rel, scan in ((shard, self._scan_tar), (table, self._scan_table)):
                    if rel not in r["scanned"]:
                        scan(rel)
                        r["scanned"].add(rel)
        return tuple(int(column[row]) for column in r["where"])

    def _scan_tar(self, shard: str) -> None:
        """Fill an old index's member offsets of one tar from its headers (every seek skips a member's data)."""
        r = self._reader
        members: dict[str, dict] = {}
        with tarfile.open(self.store.local_path(shard, self.sizes.get(shard)), mode="r:") as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = (m.offset_data, m.size)
        for position, (key, found) in enumerate(members.items()):
            shards.check_members(key, found)
            row = r["row_of"][self.offsets[shard] + position]
            if row >= 0:
                for column, value in zip(r["where"], (*found["json"], *found["safetensors"])):
                    column[row] = value

    def _scan_table(self, table: str) -> None:
        """Fill an old index's caption embedding offsets of one caption table from its header."""
        import numpy as np

        r = self._reader
        prompts, keys = self.index.codes("prompt")
        f = self._file(table)
        start, entries = shards.file_safetensors_header(f.fd)
        rows = np.flatnonzero(r["tables"] == r["table_names"].index(table))
        for row in rows:
            key = keys[int(prompts[row])].as_py()
            if key not in entries:
                raise shards.ShardError(f"{f.path}: no caption embedding {key!r}: the index and the caption "
                                        f"tables disagree; re-run precompute")
            dtype, shape, begin, end = entries[key]
            self.index.prompt_layout = (dtype, shape)
            r["where"][4][row], r["where"][5][row] = start + begin, end - begin

    def prompt_embeds(self, table: str, offset: int, size: int):
        """A caption's T5 embedding: `size` bytes at `offset` of caption table `table`."""
        import torch

        dtype, shape = self.index.prompt_layout
        return self._file(table).read_into(offset, size).view(getattr(torch, dtype)).view(shape)

    def __getitem__(self, item):
        index, batch_id = item
        r = self._prepare()
        shard, _ = self.locate(index)
        row = int(r["row_of"][index])
        if row < 0:
            raise IndexError(f"sample {index} ({shard}) is not in {self.store.url(shards.INDEX)}")
        table = r["table_names"][r["tables"][row]]
        json_at, json_size, tensors_at, tensors_size, prompt_at, prompt_size = self._locations(row, shard, table)
        f = self._file(shard)
        # each member is read with its tar header, which must be the member the index says (a tar changed
        # since, or a member that is not ours, is refused before anything of it is used)
        head = os.pread(f.fd, 512 + json_size, json_at - 512) if json_at >= 512 else b""
        key = r["keys"][row].as_py()
        _check_member(f.path, head[:512], "json", json_size, key)
        meta = json.loads(head[512:])
        buf = f.read_into(tensors_at - 512, 512 + tensors_size)
        _check_member(f.path, buf[:512].numpy().tobytes(), "safetensors", tensors_size, key)
        buf = buf[512:]
        tensors = shards.tensors_in(buf, shards.safetensors_header(buf.numpy()))
        tensors["prompt_embeds"] = self.prompt_embeds(table, prompt_at, prompt_size)
        return {"meta": meta, "tensors": tensors, "batch_id": batch_id}


def _check_member(path: Path, header: bytes, ext: str, size: int, key: str) -> None:
    """Refuse a tar member (its 512-byte header) other than the one index.parquet records: `key`.`ext`,
    `size` bytes."""
    stale = ("the tar changed after index.parquet was written (or the index belongs to other tars); "
             "re-run precompute")
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise shards.ShardError(f"{path}: no tar member where index.parquet says ({exc}): {stale}") from None
    found, _, found_ext = info.name.partition(".")
    shards.check_members(found, [found_ext])
    if (found, found_ext, info.size) != (key, ext, size):
        raise shards.ShardError(f"{path}: member {info.name} ({info.size} bytes) where index.parquet records "
                                f"{key}.{ext} ({size} bytes): {stale}")


def collate(samples: list[dict], pin_memory: bool = False) -> dict:
    """Stack one bucket's samples: tensors [B, ...] (own memory, pinned for a GPU when asked),
    metas as a list, the batch id."""
    import torch

    ids = {s["batch_id"] for s in samples}
    buckets = {s["meta"]["bucket"] for s in samples}
    if len(ids) != 1 or len(buckets) != 1:
        raise RuntimeError(f"a batch mixes batches {ids} / buckets {buckets}: sampler bug")
    out = {}
    for k, first in samples[0]["tensors"].items():
        if len(samples) == 1 and not pin_memory:   # the sample's views own their freshly read buffer
            out[k] = first.unsqueeze(0)
            continue
        out[k] = torch.empty((len(samples), *first.shape), dtype=first.dtype, pin_memory=pin_memory)
        torch.stack([s["tensors"][k] for s in samples], out=out[k])
    return {"tensors": out, "metas": [s["meta"] for s in samples], "batch_id": ids.pop()}


def view_offset(seed: int, clip: str, views: int) -> int:
    """The seeded offset o of a clip's view cycle: epoch e shows view (e + o) mod V."""
    return random.Random(f"{seed}:views:{clip}").randrange(views)


def mask_variant(seed: int, epoch: int, key: str, views: int, variants: int) -> int:
    """The --masks_per_policy geometry set a sample (view) shows in `epoch`: the sets cycle once per
    round of the clip's view cycle, from a seeded offset per sample, so over V x K epochs each view
    is shown with each of its K sets once (`key`: the sample key, `<clip>_v<view>`)."""
    if variants <= 1:
        return 0
    clip = key.rpartition("_v")[0]
    lap = (epoch + view_offset(seed, clip, views)) // views
    return (lap + random.Random(f"{seed}:mask-variant:{key}").randrange(variants)) % variants


@dataclass
class Rows:
    """What the sampler knows of each sample, as arrays (one entry per sample)."""
    index: "np.ndarray"     # global sample index (int64)
    bucket: "np.ndarray"    # codes into `buckets`
    buckets: list           # bucket names, sorted
    video: "np.ndarray"     # bool: a video (weighed by --video_repeat)
    clip: "np.ndarray"      # codes into `clips`: the samples of one clip are its views
    clips: object           # clip names, sorted (a list or a pyarrow array); named only for clips of 2+ views
    view: "np.ndarray"      # int64

    def __len__(self) -> int:
        return len(self.index)

    def take(self, keep) -> "Rows":
        """The rows selected by a boolean mask or indices."""
        return Rows(self.index[keep], self.bucket[keep], self.buckets, self.video[keep], self.clip[keep],
                    self.clips, self.view[keep])

    @classmethod
    def from_tuples(cls, rows: list[tuple]) -> "Rows":
        """(global index, bucket, kind[, sample key]) per sample; without a key each row is its own clip."""
        import numpy as np

        names = sorted({r[1] for r in rows})
        clip_view = [r[3].rpartition("_v")[::2] if len(r) > 3 else (str(r[0]), "0") for r in rows]
        clips = sorted({c for c, _ in clip_view})
        code = {c: i for i, c in enumerate(clips)}
        bucket = {b: i for i, b in enumerate(names)}
        return cls(index=np.array([r[0] for r in rows], dtype=np.int64),
                   bucket=np.array([bucket[r[1]] for r in rows], dtype=np.int32), buckets=names,
                   video=np.array([r[2] == "video" for r in rows], dtype=bool),
                   clip=np.array([code[c] for c, _ in clip_view], dtype=np.int64), clips=clips,
                   view=np.array([int(v) for _, v in clip_view], dtype=np.int64))


class BucketBatchSampler:
    """Yields this rank's batches: lists of (global sample index, global batch id).

    The views of one clip (samples whose keys differ only in `_v<view>`) are shown one per epoch:
    epoch e shows view (e + o) mod V of a clip with V views, o a seeded offset per clip, as
    CogVideoX-Fun shows one fresh window of each clip per epoch. When views land in different
    buckets an epoch's batch count can vary; `steps_in_epoch` and `locate_step` account for it.

    Everything is held in arrays (~40 bytes per sample, and the current epoch's plan, 8); the draws
    are Python `random`'s with the same seeds as ever, so the batches do not depend on how the rows
    are held.
    """

    def __init__(self, rows: "Rows | list[tuple]", *, batch_size: int, world: int, rank: int,
                 accumulation: int, seed: int, video_repeat: int = 1):
        """rows: `Rows`, or (global index, bucket, kind[, sample key]) per sample (`Rows.from_tuples`)."""
        import numpy as np

        if video_repeat < 0:
            raise ValueError(f"--video_repeat must be >= 0, got {video_repeat}")
        if not isinstance(rows, Rows):
            rows = Rows.from_tuples(rows)
        self.batch_size, self.world, self.rank = batch_size, world, rank
        self.accumulation, self.seed = accumulation, seed
        self.video_repeat = max(1, video_repeat)  # CogVideoX-Fun: 0 means "no extra repeats"
        self.epoch = 0
        # samples in clip order (clips sorted by name), a clip's views in view order
        order = np.lexsort((rows.index, rows.view, rows.clip))
        clip = rows.clip[order]
        self._index, self._bucket, self.buckets = rows.index[order], rows.bucket[order], rows.buckets
        self._repeat = np.where(rows.video[order], self.video_repeat, 1).astype(np.int32)
        first = np.flatnonzero(np.r_[True, clip[1:] != clip[:-1]]) if len(clip) else np.zeros(0, np.int64)
        self._first = first                                              # each clip's first sample
        self._views = np.diff(np.r_[first, len(clip)]).astype(np.int64)  # its number of views
        self._offset = np.zeros(len(first), dtype=np.int64)              # its seeded view offset
        for c in np.flatnonzero(self._views > 1):                        # (randrange(1) is 0)
            name = rows.clips[int(clip[first[c]])]
            name = name if isinstance(name, str) else name.as_py()
            self._offset[c] = view_offset(seed, name, int(self._views[c]))
        self.period = math.lcm(*{int(v) for v in np.unique(self._views)}) if len(first) else 1
        self._counts: dict[int, int] = {}
        self._plan: tuple | None = None    # (epoch, its global batches)
        self.n_batches = self.batches_in_epoch(0)
        if self.n_batches == 0:
            raise ValueError(
                f"not enough samples for one step: {len(first)} clips ({len(rows)} cached samples) give fewer "
                f"than {world} ranks x {accumulation} accumulation batches of {batch_size} from one bucket each")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_rows(self, epoch: int):
        """Positions (in clip order) of the samples an epoch shows: one view of each clip."""
        return self._first + (epoch + self._offset) % self._views

    def global_batches(self, epoch: int):
        """The epoch's global batches: an int64 array [batches, batch_size] of global sample indices."""
        import numpy as np

        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = random.Random(f"{self.seed}:batches:{epoch}")
        shown = self.epoch_rows(epoch)
        index, bucket, repeat = self._index[shown], self._bucket[shown], self._repeat[shown]
        parts = []
        for code in np.unique(bucket):      # buckets in name order, each in clip order, videos repeated
            mine = bucket == code
            items = np.repeat(index[mine], repeat[mine])
            items = items[_shuffled(rng, len(items))]
            n = len(items) // self.batch_size * self.batch_size
            parts.append(items[:n].reshape(-1, self.batch_size))
        batches = np.concatenate(parts) if parts else np.zeros((0, self.batch_size), dtype=np.int64)
        batches = batches[_shuffled(rng, len(batches))]
        per_step = self.world * self.accumulation
        batches = batches[: len(batches) // per_step * per_step]
        self._plan = (epoch, batches)
        return batches

    def batches_in_epoch(self, epoch: int) -> int:
        """len(global_batches(epoch)) from the bucket counts alone (memoised over the views' period)."""
        import numpy as np

        key = epoch % self.period
        if key not in self._counts:
            shown = self.epoch_rows(epoch)
            sizes = np.bincount(self._bucket[shown], weights=self._repeat[shown]).astype(np.int64)
            n = int((sizes // self.batch_size).sum())
            per_step = self.world * self.accumulation
            self._counts[key] = n // per_step * per_step
        return self._counts[key]

    def steps_in_epoch(self, epoch: int) -> int:
        return self.batches_in_epoch(epoch) // (self.world * self.accumulation)

    def locate_step(self, step: int) -> tuple[int, int]:
        """(epoch, optimizer steps before that epoch) of the epoch that holds optimizer step `step`."""
        epoch, before = 0, 0
        while before + self.steps_in_epoch(epoch) <= step:
            before += self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, before

    def __len__(self) -> int:
        return self.batches_in_epoch(self.epoch) // self.world

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, skip: int):
        """This rank's batches of the current epoch from its `skip`-th on (those before are not built)."""
        batches = self.global_batches(self.epoch)
        for g in range(self.rank + skip * self.world, len(batches), self.world):
            yield [(int(index), g) for index in batches[g]]


def _shuffled(rng: random.Random, n: int):
    """The permutation `rng.shuffle` applies to a list of n items (the same draws, whatever the items)."""
    import numpy as np

    perm = list(range(n))
    rng.shuffle(perm)
    return np.array(perm, dtype=np.int64)


def index_rows(dataset: CachedSamples, exclude=()) -> Rows:
    """The sampler's rows of every indexed sample but the global indices in `exclude` (held out)."""
    import numpy as np

    idx = dataset.index
    idx.fetch(LEAN_COLUMNS)
    gidx = dataset.global_indices()
    bucket, buckets = idx.codes("bucket")
    kind, kinds = idx.codes("kind")
    clip, clips = idx.codes("clip")
    kinds = kinds.to_pylist()
    video = kind == kinds.index("video") if "video" in kinds else np.zeros(len(kind), dtype=bool)
    rows = Rows(index=gidx, bucket=bucket, buckets=buckets.to_pylist(), video=video, clip=clip, clips=clips,
                view=idx.ints("view"))
    if len(exclude):
        rows = rows.take(~np.isin(gidx, np.asarray(list(exclude), dtype=np.int64)))
    return rows


def batches(dataset: CachedSamples, sampler: BucketBatchSampler, *, threads: int, skip: int = 0,
            pin_memory: bool = False):
    """This rank's collated batches of the sampler's current epoch, in order, read by `threads`
    threads up to 2 x threads batches ahead (0: read here, on demand). `skip`: batches of the
    epoch already trained on (resume); their index lists are dropped, nothing of them is read."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    todo = sampler.iter_from(skip)

    def load(items):
        return collate([dataset[i] for i in items], pin_memory=pin_memory)

    if threads <= 0:
        yield from map(load, todo)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="cogfun-read")
    ahead: deque = deque()
    try:
        for items in todo:
            ahead.append(pool.submit(load, items))
            if len(ahead) > 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def held_out(dataset: CachedSamples, eval_samples: float, seed: int) -> list[int]:
    """Global indices of the samples held out of training for the eval loss (sorted).

    Whole source files are held out: every sample of a file (all its views, `--num_views`, and all
    its caption variants, `file#k`, which share the index's `source` column) or none, so nothing of
    a held-out clip is trained on. `eval_samples` counts source files (a value below 1 is a
    fraction of them), the first ones in the order of a seeded hash of their paths: the same set
    on every rank, on resume, and for any world size.
    """
    if eval_samples <= 0:
        return []
    import numpy as np

    codes, names = dataset.index.codes("source")
    sources = names.to_pylist()     # sorted, distinct
    if eval_samples >= 1 and eval_samples != int(eval_samples):
        raise ConfigError(f"--eval_samples {eval_samples}: a count of source files (>= 1, whole) or a fraction (< 1)")
    n = max(1, round(eval_samples * len(sources))) if eval_samples < 1 else int(eval_samples)
    if n >= len(sources):
        raise ConfigError(f"--eval_samples {eval_samples}: holds out {n} of the {len(sources)} source files of the "
                          f"shards, leaving none to train on")
    chosen = sorted(range(len(sources)), key=lambda i: hashlib.sha256(f"{seed}:eval:{sources[i]}".encode()).hexdigest())
    return sorted(dataset.global_indices()[np.isin(codes, chosen[:n])].tolist())
