"""Reading cached shards for training: indexed random access (wids) + a seeded bucket batch sampler.

Why this shape (DESIGN §5 (b)) rather than a streaming pipeline: a batch must hold one bucket,
and resume must be exact. With a map-style dataset over the tars (wids' `IndexedTarSamples`,
mmap-indexed tar members) and a batch sampler that is a pure function of (seed, epoch, index),
the data position is just "how many batches of this epoch were consumed": accelerate's
`skip_first_batches` resumes with no replay and no decoding of skipped batches.

Global batch order: per epoch, one view of each clip is taken (cycling through a clip's views
across epochs, see `BucketBatchSampler`), each bucket's samples are shuffled (videos repeated
`video_repeat` times), cut into batches of `batch_size`, and all batches are shuffled together
(so buckets mix in proportion to their size). Global batch g goes to rank g % world; a step of
W ranks x A accumulation micro-batches consumes W*A consecutive global batches. The same global
batches, in the same order, reach one process with accumulation W*A: runs on different world
sizes train on the same data.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from cogfun import shards


class CachedSamples:
    """Map-style dataset over the manifest's tars. Item = (global index, batch id) -> sample dict."""

    def __init__(self, shard_dir: str | Path, manifest: dict, lru_size: int = 32):
        self.shard_dir = Path(shard_dir)
        self.shards = sorted(manifest["shards"])           # relative paths
        self.counts = [manifest["shards"][s] for s in self.shards]
        self.offsets = {}
        self.starts = []
        total = 0
        for s, n in zip(self.shards, self.counts):
            self.offsets[s] = total
            self.starts.append(total)
            total += n
        self.total = total
        self.lru_size = lru_size
        self._open = None

    def global_index(self, shard: str, position: int) -> int:
        return self.offsets[shard] + position

    def locate(self, index: int) -> tuple[str, int]:
        import bisect

        i = bisect.bisect_right(self.starts, index) - 1
        return self.shards[i], index - self.starts[i]

    def _tar(self, shard: str):
        from wids.wids import IndexedTarSamples
        from wids.wids_lru import LRUCache

        if self._open is None:  # per process (DataLoader workers each open their own mmaps)
            self._open = LRUCache(self.lru_size, release_handler=lambda key, value: value.close())
        if shard not in self._open:
            self._open[shard] = IndexedTarSamples(path=str(self.shard_dir / shard))
        return self._open[shard]

    def __len__(self) -> int:
        return self.total

    def read_raw(self, index: int) -> dict:
        shard, position = self.locate(index)
        return self._tar(shard)[position]

    def __getitem__(self, item):
        index, batch_id = item
        meta, tensors = shards.decode_sample(self.read_raw(index))
        return {"meta": meta, "tensors": tensors, "batch_id": batch_id}


def collate(samples: list[dict]) -> dict:
    """Stack one bucket's samples: tensors [B, ...], metas as a list, the batch id."""
    import torch

    ids = {s["batch_id"] for s in samples}
    buckets = {s["meta"]["bucket"] for s in samples}
    if len(ids) != 1 or len(buckets) != 1:
        raise RuntimeError(f"a batch mixes batches {ids} / buckets {buckets}: sampler bug")
    names = samples[0]["tensors"].keys()
    return {"tensors": {k: torch.stack([s["tensors"][k] for s in samples]) for k in names},
            "metas": [s["meta"] for s in samples], "batch_id": ids.pop()}


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
            offset = random.Random(f"{seed}:views:{clip}").randrange(len(clips[clip]))
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


def index_rows(shard_dir: str | Path, dataset: CachedSamples) -> list[tuple[int, str, str, str]]:
    """(global index, bucket, kind, sample key) for every indexed sample."""
    idx = shards.read_index(shard_dir)
    return [(dataset.global_index(s, p), b, k, key)
            for s, p, b, k, key in zip(idx["shard"], idx["position"], idx["bucket"], idx["kind"], idx["key"])]
