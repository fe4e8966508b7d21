"""Adding one clip to a finished N-clip shard dir (issue 21: nothing probed again), against the
unchanged re-run, a full probe, and cogfun before issue 21 (every file probed again).

Data: N tiny H.264 clips (9 frames of 32x32, hard links of one file under distinct names: each is
opened and probed like any other file), text-to-video, one 9x32x32 bucket, the tiny model (fp32).
The shard dir is made once (encoding N clips); then, round after round, side by side:
  unchanged   `precompute` again with the same metadata: fingerprint match, nothing probed
  add (cache) one more clip in the metadata: probes 1 file, encodes 1 clip (the sides add a new clip each;
              the sources the finished dir holds are known from its manifest, index and probe cache)
  full probe  `probe_and_plan` over the N clips without a cache (what is no longer paid)
  add (REF)   with --before REF: the same addition by cogfun at git ref REF (default 0cd6c2c = main
              before issue 21: no probe cache, every tar scanned), `precompute` in a child process
              (its own timer, imports left out)
Goal (issue 21): add (cache) <= unchanged + 5 % of a full probe.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import common as C


def add_args(p):
    p.add_argument("--clips", type=int, default=None, help="default 10000 (1000 with --quick)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--before", default="0cd6c2c", help="git ref of the 'add (REF)' side ('' to leave it out)")


def dataset(n: int):
    from cogfun.tiny import synthetic_frames, write_mp4

    root = C.OUT / "data" / f"probe-cache-{n}"
    meta = root / "clips.json"
    if not meta.exists():
        shutil.rmtree(root, ignore_errors=True)
        (root / "videos").mkdir(parents=True)
        write_mp4(root / "one.mp4", synthetic_frames(32, 32, 9, seed=0), 8)
        rows = []
        for i in range(n):
            os.link(root / "one.mp4", root / "videos" / f"c{i:05d}.mp4")
            rows.append({"file_path": f"videos/c{i:05d}.mp4", "text": f"clip {i % 50}", "type": "video"})
        meta.write_text(json.dumps(rows))
    return root, meta


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    n = args.clips or (1000 if args.quick else 10000)
    rounds = args.rounds or (1 if args.quick else 3)

    from accelerate.state import AcceleratorState

    from cogfun.buckets import Sampling
    from cogfun.dataset import load_sources, probe_and_plan
    from cogfun.stages.precompute import precompute

    model = C.tiny_model()
    root, meta = dataset(n)
    rows = json.loads(meta.read_text())
    work = C.OUT / "tmp" / f"probe-cache-{n}"
    shard_dir = work / "shards"
    live = work / "clips.json"
    cfg = C.precompute_config(model, live, shard_dir, size=32, frames=9, train_mode="normal",
                              train_data_dir=str(root), dataloader_num_workers=1)

    def run() -> dict:
        try:
            return C.quiet(precompute, cfg, progress=False)
        finally:
            AcceleratorState._reset_state(True)

    if (shard_dir / "manifest.json").exists() and live.exists():
        run()   # a dir of an earlier run of this benchmark: brought up to date with its metadata
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        live.write_text(json.dumps(rows))
        t0 = time.perf_counter()
        first = run()
        print(f"made the shard dir: {first['samples']} samples in {time.perf_counter() - t0:.0f} s "
              f"({first['probed']} probed)")
    extra = [0]

    def add_one() -> None:
        current = json.loads(live.read_text())
        name = f"videos/added{len(current):06d}.mp4"
        if not (root / name).exists():
            os.link(root / "one.mp4", root / name)
        live.write_text(json.dumps(current + [{"file_path": name, "text": "an added clip", "type": "video"}]))
        extra[0] += 1

    counts: dict[str, list] = {"add (cache)": []}

    def unchanged():
        s = run()
        assert s["status"] == "up to date", s

    def with_cache():
        add_one()
        s = run()
        assert s["encoded"] == 1, s
        counts["add (cache)"].append(s["probed"])   # 1 (shown in the table)

    sampling = Sampling.from_config(cfg)
    sources = load_sources(meta, root)[0]

    def full_probe():
        probe_and_plan(sources, sampling, workers=cfg.probe_workers, progress=False)

    sides = {"unchanged": unchanged, "add (cache)": with_cache, "full probe": full_probe}
    if args.before:
        sides[f"add ({args.before})"] = old_side(args.before, cfg, add_one, counts)
    t = C.interleave(sides, repeat=rounds, warmup=0)
    print(f"\n{n} clips (+1 per add), {rounds} round(s), probe_workers {cfg.probe_workers}:")
    rows_out = [[k, C.spread(v), (f"{C.median(counts[k]):.0f}" if counts.get(k) else
                                  ("0" if k == "unchanged" else str(n)))] for k, v in t.items()]
    print(C.table(rows_out, ["side", "seconds median (min-max)", "files probed"]))
    over = [(a - u) / p for a, u, p in zip(t["add (cache)"], t["unchanged"], t["full probe"])]
    print(f"  (add with cache - unchanged) / full probe: {C.spread(over)}")
    if args.before:
        ratio = C.per_round_ratio(t[f"add ({args.before})"], t["add (cache)"])
        print(f"  add at {args.before} / add with cache: {C.spread(ratio)}")
    C.goal("add one clip: (add - unchanged) / full probe", C.median(over), "<=", 0.05)


def old_side(ref: str, cfg, add_one, counts):
    """A callable: add one clip, run `precompute` of cogfun at `ref` in a child process, return the
    seconds its summary reports (the stage's own timer)."""
    import re
    import subprocess

    tree = C.OUT / f"before-{ref}"
    if not (tree / "stages").is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref], cwd=C.ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    code = (f"import json, sys; sys.path.insert(0, {str(tree)!r}); import cogfun; "
            f"assert cogfun.__file__.startswith({str(tree)!r}), cogfun.__file__; "
            "from cogfun.config import PrecomputeConfig; from stages.precompute import precompute; "
            "print('SUMMARY', json.dumps(precompute(PrecomputeConfig(**json.loads(sys.argv[1])), progress=False)))")
    fields = json.dumps({k: v for k, v in cfg.__dict__.items() if not k.startswith(("media_", "train_data_shards",
                                                                                     "train_data_caption"))})
    counts[f"add ({ref})"] = []

    def side():
        add_one()
        res = C.measure_process([C.PYTHON, "-c", code, fields])
        found = re.search(r"^SUMMARY (.*)$", res["output"], re.M)
        if res["rc"] != 0 or not found:
            raise RuntimeError(f"precompute at {ref} failed:\n{res['output'][-3000:]}")
        summary = json.loads(found.group(1))
        assert summary["encoded"] == 1, summary
        return summary["seconds"]

    return side


if __name__ == "__main__":
    main()
