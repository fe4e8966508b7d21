"""Decode: H.264 throughput of the decord path before / after (cogfun.video of a git ref vs this
tree), the PyAV path on the same clips for context, and the probe's cost.

Clips: H.264 / yuv420p mp4 (cogfun.tiny.write_video: moving synthetic content, crf 18, x264's
default GOP and B-frames), the common case of a real dataset. One call decodes, for every clip, the
sample precompute would decode: `video_sample_n_frames` frames `video_sample_stride` apart from a
seeded window, resized to cover the bucket and centre-cropped (cogfun.buckets.plan_clip with
enable_bucket). Sides, run round-robin (common.interleave): `before` = the ref's
`decode_video(path, indices, resize, crop)`, `after` = this tree's `decode_video(..., media=probe)`
(decord), `pyav` = the same with the probe's decoder set to pyav. Goal: after / before >= 0.95.
The probe (once per source) is timed the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import common as C


def add_args(p):
    p.add_argument("--before", default="b768720",
                   help="git ref whose cogfun/video.py is the 'before' side (default: main before issue 9)")
    p.add_argument("--clips", type=int, default=None)


def load_before(ref: str):
    """The ref's cogfun/video.py as a module of its own (it imports only third-party libraries)."""
    source = subprocess.run(["git", "-C", str(C.ROOT), "show", f"{ref}:cogfun/video.py"], check=True,
                            capture_output=True, text=True).stdout
    path = C.OUT / "decode" / f"video_{ref.replace('/', '_')}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("video_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["video_before"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    from cogfun import video
    from cogfun.buckets import Sampling, plan_clip
    from cogfun.tiny import synthetic_frames, write_video

    before = load_before(args.before)
    n = args.clips or (3 if args.quick else 6)
    frames, (h, w) = (72, (240, 432)) if args.quick else (120, (360, 640))
    sampling = Sampling(video_sample_size=256, video_sample_n_frames=17, video_sample_stride=4, enable_bucket=True)
    folder = C.OUT / "decode" / f"{n}x{frames}x{h}x{w}"
    clips = []
    for i in range(n):
        path = folder / f"clip{i}.mp4"
        if not path.exists():
            write_video(path, synthetic_frames(h, w, frames, seed=i), 24, options={"crf": "18", "preset": "veryfast"})
        info = video.probe(path, "video")
        assert info.decoder == "decord" and info.frames == frames, info
        (plan,) = plan_clip(sampling, path.name, "video", frames=frames, height=h, width=w)
        clips.append((path, info, plan))
    decoded = sum(len(p.frame_indices) for _, _, p in clips)

    def run(decode):
        def call():
            for path, info, plan in clips:
                decode(path, info, plan)
        return call

    sides = {
        "before": run(lambda path, info, p: before.decode_video(path, p.frame_indices, p.resize_hw, p.crop_box)),
        "after": run(lambda path, info, p: video.decode_video(path, p.frame_indices, p.resize_hw, p.crop_box,
                                                              media=info)),
        "pyav": run(lambda path, info, p: video.decode_video(path, p.frame_indices, p.resize_hw, p.crop_box,
                                                             media=dataclasses.replace(info, decoder="pyav"))),
    }
    # same pixels on every side
    path, info, p = clips[0]
    ref = before.decode_video(path, p.frame_indices, p.resize_hw, p.crop_box)
    import numpy as np

    for name in ("after", "pyav"):
        got = video.decode_video(path, p.frame_indices, p.resize_hw, p.crop_box,
                                 media=info if name == "after" else dataclasses.replace(info, decoder="pyav"))
        assert np.array_equal(ref, got), f"{name} decodes other pixels than before"
    repeat = 3 if args.quick else 7
    times = C.interleave(sides, repeat=repeat, warmup=1)
    probes = C.interleave({"before": lambda: [before.probe_video(c[0]) for c in clips],
                           "after": lambda: [video.probe_video(c[0]) for c in clips]}, repeat=repeat, warmup=1)

    print(f"\n{n} H.264 clips of {frames} frames at {h}x{w} (24 fps, crf 18); a call decodes one planned sample "
          f"per clip: {decoded // n} frames at stride 4, resized + cropped to {clips[0][2].height}x"
          f"{clips[0][2].width}; {repeat} rounds (+1 warm-up), round-robin:")
    rows = [[name, C.spread([t * 1e3 for t in ts]), f"{decoded / C.median(ts):.0f}"] for name, ts in times.items()]
    print(C.table(rows, ["side", "ms per call, median (min-max)", "frames/s"]))
    after_vs_before = [b / a for a, b in zip(times["after"], times["before"])]
    pyav_vs_after = [a / b for a, b in zip(times["after"], times["pyav"])]
    print(f"  decode throughput after / before (decord path): {C.spread(after_vs_before)}  (per round)")
    print(f"  pyav / decord throughput (same clips, context):  {C.spread(pyav_vs_after)}")
    probe_ratio = [a / b for a, b in zip(probes["after"], probes["before"])]
    print(f"  probe, ms per clip: before {C.median(probes['before']) / n * 1e3:.1f}, after "
          f"{C.median(probes['after']) / n * 1e3:.1f}; after / before time {C.spread(probe_ratio)}")
    C.goal("decord-path decode throughput after / before", C.median(after_vs_before), ">=", 0.95)


if __name__ == "__main__":
    main()
