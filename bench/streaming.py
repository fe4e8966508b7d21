"""Streaming: the train loader's MB/s vs a raw read of the same shard files, locally and from an
HTTP server, vs what training consumes; and the cost of resuming at batch k.

Shards of real-shape samples (49x480x720: latents 13x16x60x90 bf16 x (mean, logvar, 2 mask
policies) in the tars + one T5 embedding 226x4096 bf16 per sample's distinct caption in the caption
table = 10.8 MB per sample) written in the product's format (`common.write_real_shards`). Local
reads are warm (the page cache cannot be dropped here: both sides read from memory). The HTTP
server is Python's `http.server` in its own process on 127.0.0.1. Side by side, round after round,
one epoch each:
  raw                 sequential readinto() of every tar and caption table (8 MB chunks)
  loader, T threads   `CachedSamples` + `BucketBatchSampler` + `loader.batches` exactly as
                      `cogfun train` builds them; T = 2 is train's default (--dataloader_num_workers)
  2 worker processes  the previous design, for comparison: the same dataset in a torch DataLoader
                      with 2 worker processes (every batch moves through shared memory)
  raw HTTP            every file fetched whole over HTTP, one after the other (fsspec, one client)
  HTTP cold cache     the loader (2 threads) on the URL with an empty node cache: each tar is
                      fetched into the cache when first used, then read as a local file
  HTTP warm cache     the same with every file already in the cache
MB/s = shard-file bytes per second. Goal: loader / raw >= 0.8 locally and from HTTP (cold cache
vs raw HTTP). Training needs one sample per rank per step: MB/s needed = sample bytes / step
seconds (--step-seconds). Resume: time to the first batch after skipping k batches vs reading k+1.
"""

from __future__ import annotations

import common as C

SHAPE = (49, 480, 720)


def add_args(p):
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--step-seconds", type=float, default=1.0,
                   help="training step time to compare with (a CogVideoX-2b step at 49x480x720 on one GPU)")


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    n = args.samples or (24 if args.quick else 96)
    rounds = args.rounds or (3 if args.quick else 5)
    import shutil
    import subprocess
    import time

    import torch

    from cogfun import shards
    from cogfun.loader import BucketBatchSampler, CachedSamples, batches, collate, index_rows
    from cogfun.storage import ShardStore

    shard_dir = C.OUT / "real-shards" / f"v{shards.FORMAT_VERSION}-{n}-{'x'.join(map(str, SHAPE))}"
    if not (shard_dir / "manifest.json").exists():
        C.write_real_shards(shard_dir, n, frames=SHAPE[0], height=SHAPE[1], width=SHAPE[2])
    manifest = shards.require_manifest(shard_dir)
    rels = [*manifest["shards"], *manifest["prompt_tables"]]
    total = sum((shard_dir / r).stat().st_size for r in rels)
    sample_bytes = C.payload_bytes(C.real_sample(*SHAPE))

    port = C.free_port()
    server = subprocess.Popen([C.PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                               str(shard_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    cache = C.OUT / "streaming-cache"
    try:
        deadline = time.time() + 30
        while True:
            try:
                ShardStore(url).read_bytes(shards.MANIFEST)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

        def sampler_for(dataset):
            return BucketBatchSampler(index_rows(dataset), batch_size=1, world=1, rank=0, accumulation=1, seed=42)

        def loader(threads: int, where=shard_dir, cold: bool = False):
            """One epoch; the dataset is built once per side, as `cogfun train` builds it once per run
            (a cold-cache round starts from an empty cache and a fresh dataset)."""
            made = {}

            def run():
                if cold or not made:
                    shutil.rmtree(cache, ignore_errors=True) if cold else None
                    store = where if where == shard_dir else ShardStore(where, cache_dir=str(cache))
                    made["dataset"] = CachedSamples(store, manifest)
                    made["sampler"] = sampler_for(made["dataset"])
                for _ in batches(made["dataset"], made["sampler"], threads=threads):
                    pass
            return run

        def processes():
            dataset = CachedSamples(shard_dir, manifest)
            dl = torch.utils.data.DataLoader(dataset, batch_sampler=sampler_for(dataset), collate_fn=collate,
                                             num_workers=2, persistent_workers=False)
            for _ in dl:
                pass

        buf = bytearray(8 << 20)

        def raw():
            for r in rels:
                with open(shard_dir / r, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass

        def raw_http():
            store = ShardStore(url)
            for r in rels:
                store.read_bytes(r)

        sides = {"raw": raw, "loader, 2 threads (train default)": loader(2), "loader, 0 threads": loader(0),
                 "2 worker processes (previous design)": processes, "raw HTTP": raw_http,
                 "HTTP cold cache, 2 threads": loader(2, url, cold=True),
                 "HTTP warm cache, 2 threads": loader(2, url)}
        t = C.interleave(sides, repeat=rounds, warmup=1)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(cache, ignore_errors=True)
    rate = {k: [total / x / 1e6 for x in v] for k, v in t.items()}
    print(f"\n{n} samples of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} ({C.mb(sample_bytes)} payload each), "
          f"{C.mb(total)} of tars + caption table, warm page cache, {rounds} rounds:")
    need = sample_bytes / args.step_seconds / 1e6

    def vs(name, ref):
        return C.median(C.per_round_ratio(rate[name], rate[ref]))

    rows = [[k, C.spread(v), f"{vs(k, 'raw'):.3f}", f"{vs(k, 'raw HTTP'):.3f}" if "HTTP" in k else "-",
             f"{C.median(v) / need:.0f}x"] for k, v in rate.items()]
    print(C.table(rows, ["side", "MB/s median (min-max)", "/ raw (per round)", "/ raw HTTP (per round)",
                         f"/ training need ({need:.1f} MB/s at {args.step_seconds:g} s/step)"]))
    C.goal("loader (2 threads) / raw read, local", vs("loader, 2 threads (train default)", "raw"), ">=", 0.8)
    C.goal("loader (2 threads, cold cache) / raw HTTP read", vs("HTTP cold cache, 2 threads", "raw HTTP"), ">=", 0.8)
    C.goal("loader (2 threads) / training need", C.median(rate["loader, 2 threads (train default)"]) / need, ">=", 1.0)
    plot(rate, need, args.step_seconds)
    resume(shard_dir, manifest, sampler_for, n, rounds)


def plot(rate: dict, need: float, step_seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(rate)
    colors = {"raw": "#7f7f7f", "raw HTTP": "#7f7f7f"}
    ax.barh(names, [C.median(rate[k]) for k in names], color=[colors.get(k, "#1f77b4") for k in names])
    ax.axvline(need, color="#d62728", ls="--", label=f"training need at {step_seconds:g} s/step ({need:.0f} MB/s)")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("MB/s of shard files (median, warm page cache)")
    ax.set_title("train loader vs raw read, local and HTTP, 49x480x720 samples (10.8 MB), 2-core CPU", fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.2))
    C.save_figure(fig, "streaming")


def resume(shard_dir, manifest, sampler_for, n: int, rounds: int) -> None:
    from cogfun.loader import CachedSamples, batches

    k = n * 3 // 4

    def first(skip, reads):
        def run():
            dataset = CachedSamples(shard_dir, manifest)
            it = batches(dataset, sampler_for(dataset), threads=2, skip=skip)
            for _ in range(reads):
                next(it)
            it.close()
        return run

    t = C.interleave({"skip k, first batch": first(k, 1), "read k+1 batches": first(0, k + 1),
                      "first batch, no skip": first(0, 1)}, repeat=rounds, warmup=1)
    print(f"\nresume at batch k={k} (2 threads), {rounds} rounds:")
    rows = [[name, f"{C.median(v) * 1e3:.1f}"] for name, v in t.items()]
    print(C.table(rows, ["side", "ms median"]))
    skip = t["skip k, first batch"]
    print(f"  skip k / reading k+1: {C.spread(C.per_round_ratio(skip, t['read k+1 batches']))}")
    print(f"  skip k / first batch without skip: {C.spread(C.per_round_ratio(skip, t['first batch, no skip']))}")


if __name__ == "__main__":
    main()
