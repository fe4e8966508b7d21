"""Reading cached shards for training: indexed random access + a seeded bucket batch sampler.

Why this shape (DESIGN §5 (b)) rather than a streaming pipeline: a batch must hold one bucket,
and resume must be exact. With a map-style dataset over the tars (each tar's members indexed
once) and a batch sampler that is a pure function of (seed, epoch, index), the data position is
just "how many batches of this epoch were consumed": a resumed run drops that many batch index
lists and reads nothing of them.

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


class _Tar(_LocalFile):
    """One tar: its samples' members (extension -> (offset, size)), in tar order."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.samples: list[tuple[str, dict]] = []
        with tarfile.open(path, mode="r:") as tf:       # headers only: every seek skips a member's data
            for m in tf:
                key, _, ext = m.name.partition(".")
                if not self.samples or self.samples[-1][0] != key:
                    self.samples.append((key, {}))
                self.samples[-1][1][ext] = (m.offset_data, m.size)

    def sample(self, position: int) -> tuple[dict, dict]:
        key, members = self.samples[position]
        shards.check_members(key, members)
        meta = json.loads(os.pread(self.fd, members["json"][1], members["json"][0]))
        buf = self.read_into(*members["safetensors"])
        return meta, shards.tensors_in(buf, shards.safetensors_header(buf.numpy()))


class _Table(_LocalFile):
    """A caption table: a safetensors file read one tensor at a time."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.header = shards.file_safetensors_header(self.fd)

    def get(self, key: str):
        start, entries = self.header
        if key not in entries:
            raise shards.ShardError(f"{self.path}: no caption embedding {key!r}: the index and the caption "
                                    f"tables disagree; re-run precompute")
        import torch

        dtype, shape, begin, end = entries[key]
        return self.read_into(start + begin, end - begin).view(getattr(torch, dtype)).view(shape)


class CachedSamples:
    """Map-style dataset over the manifest's tars. Item = (global index, batch id) -> sample dict."""

    def __init__(self, store: ShardStore | str | Path, manifest: dict, index: dict | None = None,
                 open_files: int = 64):
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
        self._index = index
        self._tables_of: dict[str, str] | None = None
        self.open_files = open_files
        self._open: OrderedDict[str, _LocalFile] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def index(self) -> dict:
        if self._index is None:
            self._index = shards.read_index(self.store)
        return self._index

    def global_index(self, shard: str, position: int) -> int:
        return self.offsets[shard] + position

    def locate(self, index: int) -> tuple[str, int]:
        import bisect

        i = bisect.bisect_right(self.starts, index) - 1
        return self.shards[i], index - self.starts[i]

    def _file(self, rel: str, kind):
        """The open file `rel` (fetched into the node cache first when remote); a bounded LRU.
        Dropped files close once no reading thread holds them."""
        with self._lock:
            f = self._open.get(rel)
            if f is not None:
                self._open.move_to_end(rel)
                return f
        try:
            f = kind(self.store.local_path(rel, self.sizes.get(rel)))
        except FileNotFoundError:
            if not self.store.remote:
                raise
            # evicted by another process of the node between its fetch and our open: fetch again
            f = kind(self.store.local_path(rel, self.sizes.get(rel)))
        with self._lock:
            f = self._open.setdefault(rel, f)
            while len(self._open) > self.open_files:
                self._open.popitem(last=False)
        return f

    def __len__(self) -> int:
        return self.total

    def prompt_embeds(self, key: str):
        if self._tables_of is None:
            self._tables_of = dict(zip(self.index["prompt"], self.index["prompt_table"]))
        return self._file(self._tables_of[key], _Table).get(key)

    def __getitem__(self, item):
        index, batch_id = item
        shard, position = self.locate(index)
        meta, tensors = self._file(shard, _Tar).sample(position)
        tensors["prompt_embeds"] = self.prompt_embeds(meta["prompt"])
        return {"meta": meta, "tensors": tensors, "batch_id": batch_id}


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


class BucketBatchSampler:
    """Yields this rank's batches: lists of (global sample index, global batch id).

    The views of one clip (samples whose keys differ only in `_v<view>`) are shown one per epoch:
    epoch e shows view (e + o) mod V of a clip with V views, o a seeded offset per clip, as
    CogVideoX-Fun shows one fresh window of each clip per epoch. When views land in different
    buckets an epoch's batch count can vary; `steps_in_epoch` and `locate_step` account for it.
    """

    def __init__(self, rows: list[tuple], *, batch_size: int, world: int, rank: int,
                 accumulation: int, seed: int, video_repeat: int = 1):
        """rows: (global index, bucket, kind[, sample key]) per sample; without a key each row is its own clip."""
        if video_repeat < 0:
            raise ValueError(f"--video_repeat must be >= 0, got {video_repeat}")
        self.rows, self.batch_size, self.world, self.rank = rows, batch_size, world, rank
        self.accumulation, self.seed = accumulation, seed
        self.video_repeat = max(1, video_repeat)  # CogVideoX-Fun: 0 means "no extra repeats"
        self.epoch = 0
        clips: dict[str, list[tuple[int, tuple]]] = {}
        for row in rows:
            clip, _, view = row[3].rpartition("_v") if len(row) > 3 else (str(row[0]), "", "0")
            clips.setdefault(clip, []).append((int(view), tuple(row[:3])))
        self.clips = []   # (seeded offset, the clip's views in view order)
        for clip in sorted(clips):
            offset = view_offset(seed, clip, len(clips[clip]))
            self.clips.append((offset, [r for _, r in sorted(clips[clip])]))
        self.period = math.lcm(*{len(views) for _, views in self.clips}) if self.clips else 1
        self._counts: dict[int, int] = {}
        self.n_batches = self.batches_in_epoch(0)
        if self.n_batches == 0:
            raise ValueError(
                f"not enough samples for one step: {len(self.clips)} clips ({len(rows)} cached samples) give fewer "
                f"than {world} ranks x {accumulation} accumulation batches of {batch_size} from one bucket each")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_rows(self, epoch: int) -> list[tuple]:
        """The (index, bucket, kind) rows an epoch shows: one view of each clip."""
        return [views[(epoch + offset) % len(views)] for offset, views in self.clips]

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:batches:{epoch}")
        by_bucket: dict[str, list[int]] = {}
        for index, bucket, kind in self.epoch_rows(epoch):
            repeat = self.video_repeat if kind == "video" else 1
            by_bucket.setdefault(bucket, []).extend([index] * repeat)
        batches = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            rng.shuffle(items)
            for i in range(0, len(items) - self.batch_size + 1, self.batch_size):
                batches.append(items[i:i + self.batch_size])
        rng.shuffle(batches)
        per_step = self.world * self.accumulation
        return batches[: len(batches) // per_step * per_step]

    def batches_in_epoch(self, epoch: int) -> int:
        """len(global_batches(epoch)) from the bucket counts alone (memoised over the views' period)."""
        key = epoch % self.period
        if key not in self._counts:
            sizes: dict[str, int] = {}
            for _, bucket, kind in self.epoch_rows(epoch):
                sizes[bucket] = sizes.get(bucket, 0) + (self.video_repeat if kind == "video" else 1)
            n = sum(size // self.batch_size for size in sizes.values())
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
        batches = self.global_batches(self.epoch)
        for g in range(self.rank, len(batches), self.world):
            yield [(index, g) for index in batches[g]]


def index_rows(dataset: CachedSamples) -> list[tuple[int, str, str, str]]:
    """(global index, bucket, kind, sample key) for every indexed sample."""
    idx = dataset.index
    return [(dataset.global_index(s, p), b, k, key)
            for s, p, b, k, key in zip(idx["shard"], idx["position"], idx["bucket"], idx["kind"], idx["key"])]


def batches(dataset: CachedSamples, sampler: BucketBatchSampler, *, threads: int, skip: int = 0,
            pin_memory: bool = False):
    """This rank's collated batches of the sampler's current epoch, in order, read by `threads`
    threads up to 2 x threads batches ahead (0: read here, on demand). `skip`: batches of the
    epoch already trained on (resume); their index lists are dropped, nothing of them is read."""
    import itertools
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    todo = itertools.islice(iter(sampler), skip, None)

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
    idx = dataset.index
    sources = sorted(set(idx["source"]))
    if eval_samples >= 1 and eval_samples != int(eval_samples):
        raise ConfigError(f"--eval_samples {eval_samples}: a count of source files (>= 1, whole) or a fraction (< 1)")
    n = max(1, round(eval_samples * len(sources))) if eval_samples < 1 else int(eval_samples)
    if n >= len(sources):
        raise ConfigError(f"--eval_samples {eval_samples}: holds out {n} of the {len(sources)} source files of the "
                          f"shards, leaving none to train on")
    chosen = set(sorted(sources, key=lambda s: hashlib.sha256(f"{seed}:eval:{s}".encode()).hexdigest())[:n])
    return sorted(dataset.global_index(shard, position)
                  for shard, position, source in zip(idx["shard"], idx["position"], idx["source"]) if source in chosen)
