"""Data scale: the train side's start-up time and memory at 10k / 100k / 300k (/ 1M) samples,
before / after the lean index (issue 21).

Shards of tiny samples (latents 1x16x2x2 bf16 x (mean, logvar, 2 mask policies), one distinct
caption each with a 4x8 T5 embedding in caption tables of up to 400,000, 64 samples per tar as precompute's
default --shard_max_samples) are written once per size with the product's writer
(`common.write_real_shards`). Each measurement is a fresh process that imports torch and cogfun,
then times the start-up of one rank of 8 as `cogfun train` does it: manifest, dataset, index rows,
the 8-rank bucket batch sampler, the first batch (2 reading threads, train's default), and a resume
to the middle of the epoch (its first batch). Its peak RSS (VmHWM) is the memory.

Sides: `after` = this checkout's cogfun; `before` = the cogfun of git ref `--before` (default
0cd6c2c, main before issue 21), exported with `git archive` under bench/out/. The before side
reads a copy of each shard dir (hard links) whose index.parquet holds only the columns its cogfun
wrote (no member offsets), so both read the same tars. Sides and sizes run round-robin, medians
over `--rounds`. Per-sample memory = the growth of the peak RSS from the smallest size, per added
sample; start-up growth = start-up at 300k minus at 10k. Goals (after), from 10k to 300k samples:
<= 1 KB per sample, start-up growth <= 3 s. `--sizes 10000,100000,300000,1000000` adds 1M (4.4 GB
of shards, ~25 min to write once here).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--child" in sys.argv:
    # a measured process: the side's code first on the path, nothing else imported yet
    code, shard_dir = sys.argv[sys.argv.index("--child") + 1:][:2]
    sys.path.insert(0, code)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t_import = time.perf_counter()
    import torch  # noqa: F401

    from cogfun import shards
    from cogfun.loader import BucketBatchSampler, CachedSamples, batches, index_rows

    assert Path(shards.__file__).resolve().is_relative_to(Path(code).resolve()), shards.__file__

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    base = rss("VmRSS")
    t0 = time.perf_counter()
    manifest = shards.require_manifest(shard_dir)
    dataset = CachedSamples(shard_dir, manifest)
    sampler = BucketBatchSampler(index_rows(dataset), batch_size=1, world=8, rank=0, accumulation=1, seed=42)
    t1 = time.perf_counter()
    first = next(iter(batches(dataset, sampler, threads=2)))
    t2 = time.perf_counter()
    middle = len(sampler) // 2
    resumed = next(iter(batches(dataset, sampler, threads=2, skip=middle)))
    t3 = time.perf_counter()
    assert first["tensors"]["latent_mean"].shape[0] == 1 and resumed["batch_id"] == 8 * middle

    seen: set[int] = set()

    def array_bytes(obj, depth=0) -> int:
        """Bytes of the numpy / Arrow arrays an object holds (its attributes, dicts, lists, tuples),
        each array counted once."""
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        if hasattr(obj, "nbytes") and not isinstance(obj, (int, float)):
            return int(obj.nbytes)
        if depth > 3:
            return 0
        items = (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else
                 vars(obj).values() if hasattr(obj, "__dict__") else [])
        return sum(array_bytes(v, depth + 1) for v in items)

    held = array_bytes(dataset) + array_bytes(sampler)   # 0 on a side that holds Python lists
    print(json.dumps({"samples": len(dataset), "import_s": t0 - t_import, "setup_s": t1 - t0,
                      "first_batch_s": t2 - t1, "resume_s": t3 - t2, "startup_s": t3 - t0,
                      "rss_after_import": base, "peak_rss": rss("VmHWM"), "array_bytes": held,
                      "first": first["metas"][0]["source"],
                      "resumed": resumed["metas"][0]["source"]}))
    sys.exit(0)

import common as C  # noqa: E402

TINY = dict(frames=1, height=16, width=16)
TEXT = (4, 8)
PER_TAR = 64


def add_args(p):
    p.add_argument("--sizes", default=None, help="comma-separated sample counts (default 10000,100000,300000; "
                                                 "--quick 10000,30000)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--before", default="0cd6c2c", help="git ref of the 'before' side (default: main before issue 21)")
    p.add_argument("--sides", default="before,after")


def before_code(ref: str) -> Path:
    """The ref's cogfun package, exported once under bench/out/datascale/code-<ref>/."""
    import subprocess

    dest = C.OUT / "datascale" / f"code-{ref.replace('/', '_')}"
    if not (dest / "cogfun" / "loader.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(C.ROOT), "archive", ref, "cogfun"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def shard_dir_for(n: int) -> Path:
    """The shard dir of n tiny samples, its index written by this checkout's `shards.write_index`."""
    import pyarrow.parquet as pq

    from cogfun import shards

    path = C.OUT / "datascale" / f"shards-{n}"
    if not (path / shards.MANIFEST).exists():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        real_sample = C.real_sample
        C.real_sample = lambda *a, **k: real_sample(*a, **k, text=TEXT)  # tiny T5 embeddings
        try:
            C.write_real_shards(path, n, per_tar=PER_TAR, **TINY)
        finally:
            C.real_sample = real_sample
        print(f"  wrote {n} samples in {time.perf_counter() - t:.0f} s: {path.relative_to(C.ROOT)}")
    have = set(pq.read_schema(path / shards.INDEX).names)
    if not set(shards.INDEX_COLUMNS) <= have:   # shards of an older checkout: this one's index
        shards.write_index(path, shards.scan_shards(path), shards.prompt_tables_on_disk(path))
    return path


def old_index_copy(path: Path, columns: list[str]) -> Path:
    """A hard-linked copy of a shard dir whose index.parquet holds only `columns` (the before side's)."""
    import pyarrow.parquet as pq

    from cogfun import shards

    dest = path.with_name(path.name + "-old-index")
    if (dest / shards.MANIFEST).exists() and set(pq.read_schema(dest / shards.INDEX).names) == set(columns):
        return dest
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    for src in sorted(path.rglob("*")):
        target = dest / src.relative_to(path)
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif src.name != shards.INDEX:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, target)
    table = pq.read_table(path / shards.INDEX, columns=columns, use_threads=False)
    pq.write_table(table, dest / shards.INDEX)
    return dest


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    sizes = [int(s) for s in (args.sizes or ("10000,30000" if args.quick else "10000,100000,300000")).split(",")]
    rounds = args.rounds or (1 if args.quick else 2)
    sides = args.sides.split(",")
    old_columns = ["key", "bucket", "shard", "position", "source", "caption", "kind", "frames", "height", "width",
                   "latent_frames", "tokens", "view", "prompt", "prompt_table"]   # 0cd6c2c's INDEX_COLUMNS
    code = {"after": str(C.ROOT), "before": str(before_code(args.before)) if "before" in sides else None}
    dirs = {}
    for n in sizes:
        dirs["after", n] = shard_dir_for(n)
        if "before" in sides:
            dirs["before", n] = old_index_copy(dirs["after", n], old_columns)
    results: dict = {}
    loads: list[float] = []
    for r in range(rounds):
        for n in sizes:
            for side in sides:
                got = C.run_child([__file__, "--child", code[side], str(dirs[side, n])])
                loads.append(os.getloadavg()[0])
                results.setdefault((side, n), []).append(got)
                print(f"  round {r + 1} {side:6s} {n:>8,d}: start-up {got['startup_s']:.2f} s (setup "
                      f"{got['setup_s']:.2f}, first batch {got['first_batch_s']:.2f}, resume {got['resume_s']:.2f}), "
                      f"peak RSS {got['peak_rss'] / 1e6:.0f} MB", flush=True)
    for n in sizes:   # both sides draw the same batches
        if len(sides) == 2:
            a, b = (results[s, n][0] for s in sides)
            assert (a["first"], a["resumed"]) == (b["first"], b["resumed"]), f"{n}: sides differ: {a} {b}"
    fields = ("startup_s", "peak_rss", "setup_s", "first_batch_s", "resume_s", "rss_after_import", "array_bytes")
    med = {k: {f: C.median([g[f] for g in v]) for f in fields} for k, v in results.items()}
    rows, summary = [], {}
    lo, hi = sizes[0], max(sizes)
    top = 300_000 if 300_000 in sizes else hi    # the goals are stated from 10k to 300k samples
    for side in sides:
        for n in sizes:
            m, m0 = med[side, n], med[side, lo]
            rows.append([side, f"{n:,}", f"{m['startup_s']:.2f} s", f"{m['setup_s']:.2f} / {m['first_batch_s']:.2f} / "
                         f"{m['resume_s']:.2f}", f"{m['peak_rss'] / 1e6:.0f} MB",
                         "-" if n == lo else f"{(m['peak_rss'] - m0['peak_rss']) / (n - lo):.0f} B",
                         "-" if n == lo else f"{m['startup_s'] - m0['startup_s']:+.2f} s",
                         f"{m['array_bytes'] / n:.0f} B" if m["array_bytes"] else "(lists)"])
        if top > lo:
            summary[side] = {"bytes_per_sample": (med[side, top]["peak_rss"] - med[side, lo]["peak_rss"]) / (top - lo),
                             "startup_growth_s": med[side, top]["startup_s"] - med[side, lo]["startup_s"]}
    print(C.table(rows, ["side", "samples", "start-up", "setup / first batch / resume (s)", "peak RSS",
                         f"peak RSS per added sample (from {lo:,})", f"start-up growth (from {lo:,})",
                         "arrays held per sample"]))
    print(f"  load average during the runs: {' '.join(f'{x:.1f}' for x in loads)}")
    if "after" in summary:
        C.goal(f"memory per sample per rank, {lo:,} -> {top:,}", summary["after"]["bytes_per_sample"], "<=", 1000)
        C.goal(f"start-up growth {lo:,} -> {top:,} samples (s)", summary["after"]["startup_growth_s"], "<=", 3)
    print(json.dumps({"summary": summary, "median": {f"{s}-{n}": v for (s, n), v in med.items()}}))


if __name__ == "__main__":
    main()
