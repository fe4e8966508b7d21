"""Media corpus: how many of ~100 real files of many kinds become samples, before / after.

Writes a mixed dataset under bench/out/media_corpus/ (files are not kept in git: this script is
the corpus): clips from PyAV's FFmpeg encoders (H.264/HEVC 8 and 10 bit/AV1/VP9/VP8/MPEG-1/MPEG-2/
MPEG-4/MJPEG/ProRes/FFV1 in mp4, mov, mkv, webm, avi, ts, mpg), phone-style rotated and mirrored
clips, multi-stream files, and, when the system's `ffmpeg` is installed, its Theora / libaom AV1 /
FLV / H.264-in-MPEG-TS output; animations and photos from Pillow and pillow-heif (GIF, APNG,
animated WebP, JPEG with EXIF orientations, progressive and CMYK JPEG, PNG 8/16-bit, palette,
grey, WebP, TIFF, BMP, HEIC, AVIF, Ultra HDR, JPEG + appended image); and broken or unusable
inputs (truncated mp4 and JPEGs, random bytes, empty and missing files, audio only, cover art only,
a video track without frames, a 100-megapixel PNG, an 8x8 icon, a two-frame clip, a still listed
as a video and a clip listed as an image, caption variants and a repeated row).

Then, in a subprocess per side, loads the metadata, probes and plans every source, and decodes
every planned sample as precompute does: `before` runs the cogfun package of a git ref (default
main, extracted with `git archive`), `after` this tree. Prints samples and skips per reason.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import common as C

SAMPLING = dict(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
                video_sample_stride=2, enable_bucket=True)


def add_args(p):
    p.add_argument("--before", default="main", help="git ref of the 'before' side")


def build(root: Path) -> Path:
    """Write the corpus and its metadata.json; returns the metadata path."""
    import numpy as np
    import pillow_heif
    from PIL import Image

    from cogfun.tiny import ULTRA_HDR_XMP, synthetic_frames, write_audio, write_video

    pillow_heif.register_heif_opener()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rows: list[dict] = []

    def row(name: str, kind: str = "video", text: str | None = None) -> None:
        rows.append({"file_path": name, "text": text or f"A {kind} from {name}.", "type": kind})

    def clip(h: int, w: int, n: int, seed: int) -> np.ndarray:
        return synthetic_frames(h, w, n, seed=seed)

    # -- videos from PyAV's FFmpeg encoders
    specs = [  # name, codec, container, pix_fmt, h, w, frames, fps, options, extra
        ("phone/h264_1080p_like.mp4", "libx264", "mp4", "yuv420p", 144, 256, 30, 30, {}, {}),
        ("phone/h264_portrait.mp4", "libx264", "mp4", "yuv420p", 256, 144, 30, 30, {}, {}),
        ("phone/h264_rot90.mp4", "libx264", "mp4", "yuv420p", 144, 256, 24, 30, {}, {"rotation": 90}),
        ("phone/h264_rot270.mp4", "libx264", "mp4", "yuv420p", 144, 256, 24, 30, {}, {"rotation": -90}),
        ("phone/h264_rot180.mp4", "libx264", "mp4", "yuv420p", 144, 256, 24, 30, {}, {"rotation": 180}),
        ("phone/h264_selfie_mirrored.mp4", "libx264", "mp4", "yuv420p", 144, 256, 24, 30, {},
         {"rotation": 90, "hflip": True}),
        ("phone/hevc_8bit.mp4", "libx265", "mp4", "yuv420p", 144, 256, 24, 30, {"x265-params": "log-level=error"}, {}),
        ("phone/hevc_10bit_hdr.mov", "libx265", "mov", "yuv420p10le", 144, 256, 24, 30,
         {"x265-params": "log-level=error"}, {"rotation": 90}),
        ("camera/h264_60fps.mov", "libx264", "mov", "yuv420p", 128, 224, 40, 60, {}, {}),
        ("camera/mjpeg.avi", "mjpeg", "avi", "yuvj420p", 120, 160, 20, 25, {}, {}),
        ("camera/mpeg4_part2.avi", "mpeg4", "avi", "yuv420p", 120, 160, 20, 25, {}, {}),
        ("camera/prores.mov", "prores", "mov", "yuv422p10le", 96, 160, 12, 24, {}, {}),
        ("camera/mpeg2.ts", "mpeg2video", "mpegts", "yuv420p", 96, 160, 25, 25, {"b": "2M"}, {}),
        ("camera/mpeg2.mpg", "mpeg2video", "mpeg", "yuv420p", 96, 160, 25, 25, {"b": "2M"}, {}),
        ("camera/mpeg1.mpg", "mpeg1video", "mpeg", "yuv420p", 96, 160, 25, 25, {"b": "2M"}, {}),
        ("web/vp9.webm", "libvpx-vp9", "webm", "yuv420p", 112, 192, 24, 24,
         {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"}, {}),
        ("web/vp8.webm", "libvpx", "webm", "yuv420p", 112, 192, 24, 24, {"b": "1M"}, {}),
        ("web/av1.mp4", "libsvtav1", "mp4", "yuv420p", 112, 192, 24, 24, {"preset": "12"}, {}),
        ("web/av1.webm", "libsvtav1", "webm", "yuv420p", 112, 192, 24, 24, {"preset": "12"}, {}),
        ("web/av1.mkv", "libsvtav1", "matroska", "yuv420p", 112, 192, 24, 24, {"preset": "12"}, {}),
        ("screen/h264.mkv", "libx264", "matroska", "yuv420p", 112, 208, 40, 30, {"g": "10"}, {}),
        ("screen/h264_444.mkv", "libx264", "matroska", "yuv444p", 112, 208, 20, 30, {}, {}),
        ("screen/ffv1.mkv", "ffv1", "matroska", "yuv420p", 96, 160, 12, 30, {}, {}),
        ("screen/h264.flv", "libx264", "flv", "yuv420p", 96, 160, 20, 30, {}, {}),
        ("screen/h264.ts", "libx264", "mpegts", "yuv420p", 96, 160, 20, 30, {}, {}),
        ("misc/h264_width48.mp4", "libx264", "mp4", "yuv420p", 64, 48, 20, 24, {}, {}),
        ("misc/two_streams.mp4", "libx264", "mp4", "yuv420p", 96, 160, 20, 24, {},
         {"extra_streams": [clip(48, 80, 20, 99)]}),
        ("misc/two_frames.mp4", "libx264", "mp4", "yuv420p", 96, 160, 2, 24, {}, {}),
    ]
    for i, (name, codec, fmt, pix, h, w, n, fps, opts, extra) in enumerate(specs):
        write_video(root / name, clip(h, w, n, i), fps, codec=codec, fmt=fmt, pix_fmt=pix, options=opts, **extra)
        row(name)
    for i in range(20):  # ordinary H.264 mp4 of varied sizes and lengths
        h, w = [(96, 160), (160, 96), (128, 128), (72, 288), (120, 160)][i % 5]
        name = f"clips/h264_{i:02d}.mp4"
        write_video(root / name, clip(h, w, 12 + 4 * i, 100 + i), [24, 25, 30][i % 3])
        row(name)

    # -- the system's ffmpeg, other real encoders (when installed)
    if shutil.which("ffmpeg"):
        raw = clip(96, 160, 24, 7).tobytes()
        for name, args in [("ffmpeg/theora.ogv", ["-c:v", "libtheora", "-q:v", "7"]),
                           ("ffmpeg/theora_long.ogv", ["-c:v", "libtheora", "-q:v", "5", "-g", "6"]),
                           ("ffmpeg/aom_av1.mkv", ["-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "40"]),
                           ("ffmpeg/flv1.flv", ["-c:v", "flv"]),
                           ("ffmpeg/h264.m2ts", ["-c:v", "libx264", "-f", "mpegts"]),
                           ("ffmpeg/msmpeg4.wmv", ["-c:v", "msmpeg4v3"]),
                           ("ffmpeg/gif_by_ffmpeg.gif", [])]:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt",
                            "rgb24", "-s", "160x96", "-r", "12", "-i", "-", *args, "-pix_fmt",
                            "rgb8" if name.endswith(".gif") else "yuv420p", str(root / name)],
                           input=raw, check=True)
            row(name)

    # -- animations and photos
    frames = [Image.fromarray(f) for f in clip(96, 160, 16, 42)]
    for name, extra in [("anim/loop.gif", {}), ("anim/apng.png", {}), ("anim/webp_anim.webp", {}),
                        ("anim/sticker.webp", {"lossless": True})]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(root / name, save_all=True, append_images=frames[1:], duration=[40, 80] * 8, loop=0, **extra)
        row(name)
    frames[0].save(root / "anim/single_frame.gif")
    row("anim/single_frame.gif")                           # a still GIF listed as a video
    row("anim/loop.gif", "image", "The loop's first frame.")
    photos = [Image.fromarray(clip(120, 180, 1, 300 + i)[0]) for i in range(12)]
    (root / "photos").mkdir()
    for i, orientation in enumerate([1, 3, 6, 8, 2, 5]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photos[i].save(root / f"photos/jpeg_orient{orientation}.jpg", exif=exif.tobytes(), quality=90)
        row(f"photos/jpeg_orient{orientation}.jpg", "image")
    for name, img, kw in [("photos/progressive.jpg", photos[6], {"progressive": True}),
                          ("photos/cmyk.jpg", photos[7].convert("CMYK"), {}),
                          ("photos/grey.png", photos[8].convert("L"), {}),
                          ("photos/palette.png", photos[9].convert("P"), {"transparency": 0}),
                          ("photos/rgba.png", photos[10].convert("RGBA"), {}),
                          ("photos/deep16.png", Image.fromarray((np.asarray(photos[11].convert("L"), np.uint16) * 257)), {}),
                          ("photos/still.webp", photos[0], {}),
                          ("photos/scan.tiff", photos[1], {}),
                          ("photos/screenshot.bmp", photos[2], {})]:
        img.save(root / name, **kw)
        row(name, "image")
    for i, orientation in enumerate([1, 6, 8]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photos[i].save(root / f"photos/iphone_{orientation}.heic", "HEIF", exif=exif.tobytes(), quality=80)
        row(f"photos/iphone_{orientation}.heic", "image")
    for i, orientation in enumerate([1, 6]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photos[3 + i].save(root / f"photos/avif_{orientation}.avif", "AVIF", exif=exif.tobytes(), quality=70)
        row(f"photos/avif_{orientation}.avif", "image")
    gain = photos[5].convert("L").resize((45, 30))
    for i in range(2):
        photos[i].save(root / f"photos/ultrahdr_{i}.jpg", "MPO", save_all=True, append_images=[gain],
                       xmp=ULTRA_HDR_XMP, quality=90)
        row(f"photos/ultrahdr_{i}.jpg", "image")
    jpeg, tail = io.BytesIO(), io.BytesIO()
    photos[4].save(jpeg, "JPEG", quality=90)
    gain.save(tail, "JPEG")
    (root / "photos/appended.jpg").write_bytes(jpeg.getvalue() + tail.getvalue())
    row("photos/appended.jpg", "image")

    # -- broken and unusable
    bad = root / "bad"
    bad.mkdir()
    good_mp4 = (root / "clips/h264_05.mp4").read_bytes()
    (bad / "half.mp4").write_bytes(good_mp4[: len(good_mp4) // 2])
    (bad / "cut_end.mp4").write_bytes(good_mp4[:-200])
    (bad / "jpeg_no_marker.jpg").write_bytes(jpeg.getvalue()[:-1])
    (bad / "jpeg_no_marker2.jpg").write_bytes(jpeg.getvalue()[:-2])
    (bad / "jpeg_half.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    png = io.BytesIO()
    photos[5].save(png, "PNG")
    (bad / "png_cut.png").write_bytes(png.getvalue()[:-40])
    rng = np.random.default_rng(0)
    (bad / "random.mp4").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (bad / "random.jpg").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (bad / "empty.mp4").write_bytes(b"")
    write_audio(bad / "voice_memo.m4a")
    write_audio(bad / "song.mp3", codec="mp3", fmt="mp3")
    write_audio(bad / "podcast.mp4")
    write_audio(bad / "sound.wav", codec="pcm_s16le", fmt="wav")
    write_audio(bad / "album_with_cover.m4a", cover=clip(64, 64, 1, 5)[0])
    write_audio(bad / "no_frames.mkv", fmt="matroska", empty_video=True)
    Image.new("RGB", (10000, 10000), (30, 60, 90)).save(bad / "poster_100mp.png")
    Image.fromarray(clip(8, 8, 1, 1)[0]).save(bad / "favicon.png")
    for name in ["half.mp4", "cut_end.mp4", "random.mp4", "empty.mp4", "voice_memo.m4a", "song.mp3", "podcast.mp4",
                 "sound.wav", "album_with_cover.m4a", "no_frames.mkv", "missing.mp4"]:
        row(f"bad/{name}")
    for name in ["jpeg_no_marker.jpg", "jpeg_no_marker2.jpg", "jpeg_half.jpg", "png_cut.png", "random.jpg",
                 "poster_100mp.png", "favicon.png"]:
        row(f"bad/{name}", "image")
    row("photos/grey.png", "video")                          # a still listed as a video
    row("clips/h264_00.mp4", "image")                        # a clip listed as an image
    # caption variants (trained as such by CogVideoX-Fun) and one repeated row
    for text in ("The same clip, another caption.", "A third way to say it."):
        row("clips/h264_01.mp4", "video", text)
    rows.append(dict(rows[0]))
    meta = root / "metadata.json"
    meta.write_text(json.dumps(rows, indent=1))
    return meta


CATEGORIES = [  # (words in a reason of the 'before' code, category) for counting its skips alike
    ("file not found", "not found"), ("empty file", "empty file"), ("duplicate", "duplicate row"),
    ("no text", "bad row"), ("no file_path", "bad row"), ("type must", "bad row"), ("too short", "too short"),
    ("decode failed", "decode failed"), ("cannot read image", "corrupt"), ("cannot decode video", "corrupt"),
]


def count(meta: Path) -> dict:
    """Probe, plan and decode every sample with the cogfun on sys.path (old or new API)."""
    from cogfun import video
    from cogfun.buckets import Sampling
    from cogfun.dataset import load_sources, probe_and_plan

    sources, row_skips = load_sources(meta, meta.parent)
    plans, skips, by_key = probe_and_plan(sources, Sampling(**SAMPLING), workers=2, progress=False)
    failed = {}
    for p in plans:
        src = by_key[p.key]
        try:
            if hasattr(video, "decode"):
                video.decode(src.path, p.kind, list(p.frame_indices), p.resize_hw, p.crop_box, media=src.media)
            elif p.kind == "video":
                video.decode_video(src.path, p.frame_indices, p.resize_hw, p.crop_box)
            else:
                video.decode_image(src.path, p.resize_hw, p.crop_box)
        except (video.MediaError, ValueError) as e:
            failed.setdefault((p.source, p.kind), f"decode failed: {e}")
    decoded = {(p.source, p.kind, getattr(p, "identity", p.source)) for p in plans if (p.source, p.kind) not in failed}
    reasons = [(s.file_path, s.reason, getattr(s, "category", None)) for s in row_skips + skips]
    reasons += [(f, r, "decode failed") for (f, _), r in failed.items()]
    by_category = Counter()
    for _, reason, category in reasons:
        by_category[category or next((c for w, c in CATEGORIES if w in reason), "other")] += 1
    decoders = Counter()
    for src in {(s.path, s.kind): s for s in by_key.values()}.values():
        decoders[getattr(getattr(src, "media", None), "decoder", "decord" if src.kind == "video" else "pillow")] += 1
    return {"rows": len(sources) + len(row_skips), "samples": len(decoded),
            "files": len({(f, k) for f, k, _ in decoded}), "skips": dict(by_category), "decoders": dict(decoders),
            "reasons": sorted(reasons)}


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    meta = build(C.OUT / "media_corpus" / "data")
    files = sum(1 for p in meta.parent.rglob("*") if p.is_file() and p.name != "metadata.json")
    before_src = C.OUT / "media_corpus" / f"src-{args.before.replace('/', '_')}"
    if before_src.exists():
        shutil.rmtree(before_src)
    before_src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(C.ROOT), "archive", args.before, "cogfun"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive, check=True)
    results = {}
    for side, src in (("before", before_src), ("after", C.ROOT)):
        code = (f"import json, sys; sys.path.insert(0, {str(C.BENCH)!r}); import media_corpus; "
                f"sys.path.remove({str(C.ROOT)!r}); sys.path.insert(0, {str(src)!r}); "
                f"print(json.dumps(media_corpus.count(media_corpus.Path({str(meta)!r}))))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(src))
        if out.returncode:
            raise SystemExit(f"{side} side failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    b, a = results["before"], results["after"]
    print(f"\n{files} files, {a['rows']} metadata rows (bench/out/media_corpus/data); planned with "
          f"{SAMPLING}; every planned sample decoded:")
    cats = sorted(set(b["skips"]) | set(a["skips"]), key=lambda c: -(b["skips"].get(c, 0) + a["skips"].get(c, 0)))
    rows = [["samples (decoded)", b["samples"], a["samples"]], ["(file, type) pairs giving samples", b["files"], a["files"]]]
    rows += [[f"skipped: {c}", b["skips"].get(c, 0), a["skips"].get(c, 0)] for c in cats]
    rows += [[f"read by {d}", b["decoders"].get(d, 0), a["decoders"].get(d, 0)]
             for d in sorted(set(b["decoders"]) | set(a["decoders"]))]
    print(C.table(rows, ["", f"before ({args.before})", "after"]))
    print("\nafter, every skip:")
    for f, reason, category in a["reasons"]:
        print(f"  [{category}] {f}: {reason}")
    newly = sorted({f for f, _, _ in b["reasons"]} - {f for f, _, _ in a["reasons"]})
    print(f"\nskipped before, samples now ({len(newly)}): {', '.join(newly)}")


if __name__ == "__main__":
    main()
