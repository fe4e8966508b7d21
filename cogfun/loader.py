"""Reading cached shards for training: indexed random access (wids) + a seeded bucket batch sampler.

Why this shape (DESIGN §5 (b)) rather than a streaming pipeline: a batch must hold one bucket,
and resume must be exact. With a map-style dataset over the tars (wids' `IndexedTarSamples`,
mmap-indexed tar members) and a batch sampler that is a pure function of (seed, epoch, index),
the data position is just "how many batches of this epoch were consumed": accelerate's
`skip_first_batches` resumes with no replay and no decoding of skipped batches.

Global batch order: per epoch, each bucket's samples are shuffled (videos repeated
`video_repeat` times), cut into batches of `batch_size`, and all batches are shuffled together
(so buckets mix in proportion to their size). Global batch g goes to rank g % world; a step of
W ranks x A accumulation micro-batches consumes W*A consecutive global batches. The same global
batches, in the same order, reach one process with accumulation W*A: runs on different world
sizes train on the same data.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from cogfun import shards
from cogfun.config import ConfigError


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
    """Yields this rank's batches: lists of (global sample index, global batch id)."""

    def __init__(self, rows: list[tuple[int, str, str]], *, batch_size: int, world: int, rank: int,
                 accumulation: int, seed: int, video_repeat: int = 1):
        """rows: (global index, bucket, kind) per sample."""
        if video_repeat < 0:
            raise ValueError(f"--video_repeat must be >= 0, got {video_repeat}")
        self.rows, self.batch_size, self.world, self.rank = rows, batch_size, world, rank
        self.accumulation, self.seed = accumulation, seed
        self.video_repeat = max(1, video_repeat)  # CogVideoX-Fun: 0 means "no extra repeats"
        self.epoch = 0
        self.n_batches = len(self.global_batches(0))  # the same every epoch (per-bucket counts are fixed)
        if self.n_batches == 0:
            raise ValueError(
                f"not enough samples for one step: {len(rows)} cached samples give fewer than "
                f"{world} ranks x {accumulation} accumulation batches of {batch_size} from one bucket each")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:batches:{epoch}")
        by_bucket: dict[str, list[int]] = {}
        for index, bucket, kind in self.rows:
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

    def steps_per_epoch(self) -> int:
        return self.n_batches // (self.world * self.accumulation)

    def __len__(self) -> int:
        return self.n_batches // self.world

    def __iter__(self):
        batches = self.global_batches(self.epoch)
        for g in range(self.rank, len(batches), self.world):
            yield [(index, g) for index in batches[g]]


def index_rows(shard_dir: str | Path, dataset: CachedSamples) -> list[tuple[int, str, str]]:
    """(global index, bucket, kind) for every indexed sample."""
    idx = shards.read_index(shard_dir)
    return [(dataset.global_index(s, p), b, k)
            for s, p, b, k in zip(idx["shard"], idx["position"], idx["bucket"], idx["kind"])]


def held_out(shard_dir: str | Path, dataset: CachedSamples, eval_samples: float, seed: int) -> list[int]:
    """Global indices of the samples held out of training for the eval loss (sorted).

    `eval_samples` of them (a value below 1 is a fraction of all samples), the first ones in the
    order of a seeded hash of their keys: the same set on every rank, on resume, and for any
    world size. Each view of a clip (`--num_views`) is a sample of its own.
    """
    if eval_samples <= 0:
        return []
    idx = shards.read_index(shard_dir)
    total = len(idx["key"])
    if eval_samples >= 1 and eval_samples != int(eval_samples):
        raise ConfigError(f"--eval_samples {eval_samples}: a count (>= 1, whole) or a fraction (< 1)")
    n = max(1, round(eval_samples * total)) if eval_samples < 1 else int(eval_samples)
    if n >= total:
        raise ConfigError(f"--eval_samples {eval_samples}: holds out {n} of the {total} cached samples, "
                          f"leaving none to train on")
    order = sorted(range(total), key=lambda j: hashlib.sha256(f"{seed}:eval:{idx['key'][j]}".encode()).hexdigest())
    return sorted(dataset.global_index(idx["shard"][j], idx["position"][j]) for j in order[:n])
