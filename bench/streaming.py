"""Streaming: the train loader's MB/s vs a raw read of the same shard files, vs what training
consumes, and the cost of resuming at batch k.

Shards of real-shape samples (49x480x720: latents 13x16x60x90 bf16 x (mean, logvar, 2 mask
policies) + T5 226x4096 bf16 = 10.9 MB) written with the product's `encode_sample` +
`BucketWriters`; read warm (the page cache cannot be dropped here: both sides read from memory).
Side by side, round after round, one epoch each:
  raw        sequential readinto() of every tar file (8 MB chunks)
  decode     `CachedSamples[i]` for every sample in this process: wids mmap + safetensors decode;
             then cumulatively what a loader worker adds: `collate`, moving the batch into shared
             memory, and the pickle round trip that hands it to the main process
  loader/W   `CachedSamples` + `BucketBatchSampler` + DataLoader(collate) exactly as
             `cogfun train` builds them, W worker processes (train's default is 2)
MB/s = shard-file bytes per second. Goal: loader / raw >= 0.8. Training needs one sample per rank
per step: MB/s needed = sample bytes / step seconds (--step-seconds). Resume: time to the first
batch after `accelerate.skip_first_batches(loader, k)` vs reading k+1 batches.
"""

from __future__ import annotations

import common as C

SHAPE = (49, 480, 720)


def add_args(p):
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--step-seconds", type=float, default=1.0,
                   help="training step time to compare with (a CogVideoX-2b step at 49x480x720 on one GPU)")
    p.add_argument("--profile", action="store_true", help="cProfile the in-process decode side once")


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    n = args.samples or (24 if args.quick else 96)
    rounds = args.rounds or (3 if args.quick else 5)
    import torch

    from cogfun.loader import BucketBatchSampler, CachedSamples, collate, index_rows

    shard_dir = C.OUT / "real-shards" / f"{n}-{'x'.join(map(str, SHAPE))}"
    if not (shard_dir / "manifest.json").exists():
        C.write_real_shards(shard_dir, n, frames=SHAPE[0], height=SHAPE[1], width=SHAPE[2])
    from cogfun import shards

    manifest = shards.require_manifest(shard_dir)
    files = [shard_dir / s for s in manifest["shards"]]
    total = sum(f.stat().st_size for f in files)
    sample_bytes = C.payload_bytes(C.real_sample(*SHAPE))

    def make_loader(workers: int, collate_fn=collate):
        dataset = CachedSamples(shard_dir, manifest)
        sampler = BucketBatchSampler(index_rows(shard_dir, dataset), batch_size=1, world=1, rank=0,
                                     accumulation=1, seed=42)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                           num_workers=workers, generator=torch.Generator().manual_seed(42),
                                           persistent_workers=False, pin_memory=False)

    buf = bytearray(8 << 20)

    def raw():
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass

    def decode(upto: str = "decode"):
        """In this process, one sample at a time, up to a stage of what a loader worker does."""
        import io
        import pickle
        from multiprocessing.reduction import ForkingPickler

        def run():
            dataset = CachedSamples(shard_dir, manifest)
            for i in range(len(dataset)):
                batch = dataset[(i, 0)]
                if upto == "decode":
                    continue
                batch = collate([batch])
                if upto == "collate":
                    continue
                for v in batch["tensors"].values():
                    v.share_memory_()
                if upto == "pickle":
                    buf = io.BytesIO()
                    ForkingPickler(buf).dump(batch)
                    pickle.loads(buf.getvalue())
        return run

    def epoch(workers, collate_fn=collate):
        def run():
            for _ in make_loader(workers, collate_fn):
                pass
        return run

    sides = {"raw": raw, "decode (in process)": decode(), "+ collate": decode("collate"),
             "+ move to shared memory": decode("shm"), "+ pickle round trip (fd hand-off)": decode("pickle"),
             "loader, 0 workers": epoch(0),
             "loader, 2 workers": epoch(2), "what-if: 2 workers, stack into shm": epoch(2, collate_into_shared)}
    if args.profile:
        profile(decode())
    t = C.interleave(sides, repeat=rounds, warmup=1)
    rate = {k: [total / x / 1e6 for x in v] for k, v in t.items()}
    print(f"\n{n} samples of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} ({C.mb(sample_bytes)} payload each), "
          f"{C.mb(total)} of tars, warm page cache, {rounds} rounds:")
    need = sample_bytes / args.step_seconds / 1e6
    rows = [[k, C.spread(v), f"{C.median(C.per_round_ratio(v, rate['raw'])):.3f}",
             f"{C.median(v) / need:.0f}x"] for k, v in rate.items()]
    print(C.table(rows, ["side", "MB/s median (min-max)", "/ raw (per round)",
                         f"/ training need ({need:.1f} MB/s at {args.step_seconds:g} s/step)"]))
    C.goal("loader (2 workers) / raw read", C.median(C.per_round_ratio(rate["loader, 2 workers"], rate["raw"])),
           ">=", 0.8)
    C.goal("loader (2 workers) / training need", C.median(rate["loader, 2 workers"]) / need, ">=", 1.0)
    plot(rate, need, args.step_seconds)
    resume(make_loader, n, rounds)


def plot(rate: dict, need: float, step_seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(rate)
    ax.barh(names, [C.median(rate[k]) for k in names], color=["#7f7f7f"] + ["#1f77b4"] * 4 + ["#2ca02c"] * 2
            + ["#bcbd22"])
    ax.axvline(need, color="#d62728", ls="--", label=f"training need at {step_seconds:g} s/step ({need:.0f} MB/s)")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("MB/s of shard files (median, warm page cache)")
    ax.set_title("train loader vs raw read, 49x480x720 samples (10.8 MB), 2-core CPU", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.2))
    C.save_figure(fig, "streaming")


def collate_into_shared(samples: list[dict]) -> dict:
    """What-if, not product code: `cogfun.loader.collate`, but in a worker the batch is stacked
    straight into shared memory (as torch's default_collate does), saving the copy that sending
    a batch to the main process otherwise makes."""
    import torch

    if torch.utils.data.get_worker_info() is None:
        from cogfun.loader import collate

        return collate(samples)
    out = {}
    for k in samples[0]["tensors"]:
        elems = [s["tensors"][k] for s in samples]
        storage = elems[0].untyped_storage()._new_shared(sum(e.nbytes for e in elems))
        out[k] = torch.stack(elems, out=elems[0].new(storage).view(elems[0].dtype).view(len(elems), *elems[0].shape))
    return {"tensors": out, "metas": [s["meta"] for s in samples], "batch_id": samples[0]["batch_id"]}


def resume(make_loader, n: int, rounds: int) -> None:
    from accelerate import skip_first_batches

    k = n * 3 // 4

    def first_after_skip():
        next(iter(skip_first_batches(make_loader(2), k)))

    def read_through():
        it = iter(make_loader(2))
        for _ in range(k + 1):
            next(it)

    def first_fresh():
        next(iter(make_loader(2)))

    t = C.interleave({"skip k, first batch": first_after_skip, "read k+1 batches": read_through,
                      "first batch, no skip": first_fresh}, repeat=rounds, warmup=1)
    print(f"\nresume at batch k={k} (2 workers), {rounds} rounds:")
    rows = [[name, f"{C.median(v) * 1e3:.0f}"] for name, v in t.items()]
    print(C.table(rows, ["side", "ms median"]))
    skip = t["skip k, first batch"]
    print(f"  skip_first_batches / reading k+1: {C.spread(C.per_round_ratio(skip, t['read k+1 batches']))}")
    print(f"  skip_first_batches / first batch without skip: "
          f"{C.spread(C.per_round_ratio(skip, t['first batch, no skip']))}")


def profile(fn) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
