"""Real-world media: every kind of file FFmpeg or an image library reads becomes the right frames,
or a skip with a precise reason.

The files are real encoder output built at test time (:func:`cogfun.tiny.write_media_zoo`: PyAV's
FFmpeg encoders, Pillow, pillow-heif) plus one committed Theora clip (``tests/data``). Every
picture is ``synthetic_frames(32, 64, 12, seed=5)`` (or its first frame), so a decoded frame is
identified by its nearest source frame (displayed upright: rotated / mirrored as the file says),
as in test_video.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogfun.buckets import Sampling
from cogfun.dataset import load_sources, media_report, probe_and_plan
from cogfun.tiny import synthetic_frames, write_media_zoo, write_video
from cogfun.video import MediaError, decode_image, decode_video, probe

DATA = Path(__file__).resolve().parent / "data"
H, W, N = 32, 64, 12


def cw(a):  # EXIF orientation 6: shown rotated 90 degrees clockwise
    return np.rot90(a, -1)


def ccw(a):  # orientation 8, or a display matrix of +90 degrees (counter-clockwise)
    return np.rot90(a, 1)


def same(a):
    return a


# file -> (decoder, frames, fps, displayed (h, w), how a source frame is displayed, frame-error bound)
VIDEOS = {
    "h264.mp4": ("decord", N, 12.0, (H, W), same, 12),
    "rot90.mp4": ("decord", N, 12.0, (W, H), ccw, 12),
    "rot90_hflip.mp4": ("pyav", N, 12.0, (W, H), lambda a: np.fliplr(ccw(a)), 12),
    "av1.mp4": ("pyav", N, 12.0, (H, W), same, 14),
    "vp9.webm": ("pyav", N, 12.0, (H, W), same, 14),
    "h264.mkv": ("pyav", 2 * N, 12.0, (H, W), same, 12),
    "mpeg1.mpg": ("pyav", N, 24.0, (H, W), same, 14),
    "hevc10.mp4": ("pyav", N, 12.0, (H, W), same, 14),
    "two_streams.mp4": ("decord", N, 12.0, (H, W), same, 12),
    "theora.ogv": ("pyav", N, 12.0, (H, W), same, 14),
    "anim.gif": ("pillow", N, 12.5, (H, W), same, 14),
    "anim.png": ("pillow", N, 12.5, (H, W), same, 1),
    "anim.webp": ("pillow", N, 12.5, (H, W), same, 1),
}
# file -> (decoder, displayed (h, w), how the first source frame is displayed, warning expected)
IMAGES = {
    "photo.heic": ("pillow-heif", (W, H), cw, False),
    "photo.avif": ("pillow", (W, H), ccw, False),
    "ultrahdr.jpg": ("pillow", (H, W), same, False),
    "appended.jpg": ("pillow", (H, W), same, False),
    "cut_marker.jpg": ("pillow", (H, W), same, True),
    "anim.gif": ("pillow", (H, W), same, False),
}
SKIPS = {  # (file, type) -> (category, words of the reason)
    ("zoo/audio.mp4", "video"): ("no video stream", "audio only: aac"),
    ("zoo/cover_audio.mp4", "video"): ("no video stream", "a cover image is not a video"),
    ("zoo/no_frames.mkv", "video"): ("zero frames", "the video stream has no frames"),
    ("zoo/cut_scan.jpg", "image"): ("corrupt", "truncated"),
    ("zoo/tiny.png", "image"): ("too small", "8x8 px"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo's metadata.json (+ the committed Theora clip); data dir = its parent."""
    meta = write_media_zoo(tmp_path_factory.mktemp("zoo"), height=H, width=W, frames=N, seed=5)
    shutil.copy(DATA / "theora.ogv", meta.parent / "zoo/theora.ogv")
    rows = json.loads(meta.read_text())
    rows.append({"file_path": "zoo/theora.ogv", "text": "A Theora clip.", "type": "video"})
    meta.write_text(json.dumps(rows))
    return meta


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return synthetic_frames(H, W, 2 * N, seed=5)  # the Matroska clip's 24 frames; the others use the first 12


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()))


def _nearest(frame: np.ndarray, candidates: list[np.ndarray]) -> tuple[int, float, float]:
    errors = [_rmse(frame, c) for c in candidates]
    order = np.argsort(errors)
    return int(order[0]), errors[order[0]], errors[order[1]]


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_videos_give_the_right_frames(zoo: Path, source: np.ndarray, name: str) -> None:
    decoder, frames, fps, hw, shown, bound = VIDEOS[name]
    path = zoo.parent / "zoo" / name
    info = probe(path, "video")
    assert (info.decoder, info.frames, (info.height, info.width)) == (decoder, frames, hw), info
    assert info.fps == pytest.approx(fps, rel=1e-6)
    expected = [shown(f) for f in source[:frames]]
    indices = [frames - 1, 0, 2, frames // 2, 2, frames - 2]   # out of order, a repeat, both ends
    notes: list[str] = []
    out = decode_video(path, indices, hw, (0, 0, *hw), media=info, notes=notes)
    assert out.shape == (len(indices), *hw, 3) and out.dtype == np.uint8
    for got, want in zip(out, indices):
        index, error, runner_up = _nearest(got, expected)
        assert index == want and error < bound < runner_up, (index, want, error, runner_up)
    assert notes == []
    # resize + crop as for any clip: the crop of the resized upright frame
    small = decode_video(path, [3], (hw[0] // 2, hw[1] // 2), (0, 0, hw[0] // 2, hw[1] // 4), media=info)
    ref = np.asarray(Image.fromarray(expected[3]).resize((hw[1] // 2, hw[0] // 2), Image.Resampling.BICUBIC))
    ref = ref[:, : hw[1] // 4]
    assert small.shape == (1, hw[0] // 2, hw[1] // 4, 3) and _rmse(small[0], ref) < bound


def test_a_late_window_of_a_long_pyav_clip(zoo: Path, source: np.ndarray) -> None:
    """Matroska H.264 with B-frames and a keyframe every 8 frames: decoding starts at the keyframe
    before the window (seek), and frames are placed by their timestamps."""
    path = zoo.parent / "zoo/h264.mkv"
    info = probe(path, "video")
    for window in ([21, 22, 23], [9, 11, 13], [8]):
        out = decode_video(path, window, (H, W), (0, 0, H, W), media=info)
        assert [_nearest(f, list(source))[0] for f in out] == window


@pytest.mark.parametrize("name", ["h264.mp4", "rot90.mp4"])
def test_decord_and_pyav_give_the_same_pixels(zoo: Path, name: str) -> None:
    """What decord reads, PyAV reads identically (same FFmpeg conversion; rotation applied by
    decord itself vs by cogfun from the display matrix)."""
    path = zoo.parent / "zoo" / name
    info = probe(path, "video")
    assert info.decoder == "decord"
    hw = (info.height, info.width)
    by_decord = decode_video(path, [0, 5, 11], hw, (0, 0, *hw), media=info)
    by_pyav = decode_video(path, [0, 5, 11], hw, (0, 0, *hw), media=dataclasses.replace(info, decoder="pyav"))
    assert np.array_equal(by_decord, by_pyav)


def test_decord_failing_mid_decode_falls_back_to_pyav(tmp_path: Path) -> None:
    """A real decord bug: at a width of 48 px its frames come back with the wrong shape (it opens
    and counts the file fine). The decode notices, reads the clip with PyAV and says so."""
    frames = synthetic_frames(32, 48, 8, seed=2)
    path = tmp_path / "w48.mp4"
    write_video(path, frames, 12)
    info = probe(path, "video")
    assert info.decoder == "decord" and (info.frames, info.height, info.width) == (8, 32, 48)
    notes: list[str] = []
    out = decode_video(path, [1, 6], (32, 48), (0, 0, 32, 48), media=info, notes=notes)
    assert [_nearest(f, list(frames))[0] for f in out] == [1, 6]
    assert len(notes) == 1 and notes[0].startswith("decord failed (") and notes[0].endswith("read with pyav")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_images_give_the_right_picture(zoo: Path, source: np.ndarray, name: str) -> None:
    decoder, hw, shown, warned = IMAGES[name]
    path = zoo.parent / "zoo" / name
    info = probe(path, "image")
    assert (info.decoder, info.frames, (info.height, info.width)) == (decoder, 1, hw), info
    assert bool(info.note) == warned and (not warned or "truncated JPEG" in info.note), info.note
    notes: list[str] = []
    out = decode_image(path, hw, (0, 0, *hw), notes=notes)
    assert out.shape == (1, *hw, 3)
    assert _rmse(out[0], shown(source[0])) < 12
    assert len(notes) == warned


def test_what_stays_skipped_says_why(zoo: Path) -> None:
    sources, _ = load_sources(zoo, zoo.parent)
    plans, skipped, by_key = probe_and_plan(sources, Sampling(video_sample_size=32, image_sample_size=32,
                                                              video_sample_n_frames=5, video_sample_stride=2),
                                            workers=2, progress=False)
    got = {(s.file_path, next(src.kind for src in sources if src.file_path == s.file_path)): s for s in skipped}
    assert set(got) == set(SKIPS), sorted(got)
    for key, (category, words) in SKIPS.items():
        assert got[key].category == category and words in got[key].reason, got[key]
    planned = {(p.source, p.kind) for p in plans}
    assert len(planned) == len(sources) - len(SKIPS)
    report = media_report(by_key.values())
    assert report["decoders"] == {
        "pillow": ["zoo/anim.gif", "zoo/anim.png", "zoo/anim.webp"],       # (the GIF as a video)
        "pillow-heif": ["zoo/photo.heic"],
        "pyav": sorted(f"zoo/{n}" for n, v in VIDEOS.items() if v[0] == "pyav")}
    assert [w["file_path"] for w in report["warnings"]] == ["zoo/cut_marker.jpg"]


def test_more_precise_reasons(zoo: Path, tmp_path: Path) -> None:
    photo = zoo.parent / "zoo/appended.jpg"
    with pytest.raises(MediaError, match=r"^image too large: 32x64 \(HxW\) = 2,048 pixels, above the decompression-bomb "
                                         r"limit of 1,000 \(raise it with --max_image_pixels\)$") as e:
        probe(photo, "image", max_pixels=1000)
    assert e.value.category == "too large"
    assert probe(photo, "image", max_pixels=2048).height == H   # the limit itself is allowed

    with pytest.raises(MediaError, match=r"^a still JPEG image \(32x64 HxW\), not a video") as e:
        probe(photo, "video")
    assert e.value.category == "not a video"
    with pytest.raises(MediaError, match=r"an audio file \(aac\), not an image") as e:
        probe(zoo.parent / "zoo/audio.mp4", "image")
    assert e.value.category == "not an image"


def test_max_image_pixels_governs_animation_frames(zoo: Path, monkeypatch) -> None:
    """--max_image_pixels reaches the decode of an animation listed as a video (Pillow reads its
    frames), in both directions: a lower limit refuses it, a higher one than the default reads it."""
    from cogfun import video

    gif = zoo.parent / "zoo/anim.gif"
    info = probe(gif, "video")
    args = (gif, "video", [0, 2, 4], (H, W), (0, 0, H, W))
    with pytest.raises(MediaError, match=r"^image too large: 32x64 \(HxW\) = 2,048 pixels") as e:
        video.decode(*args, media=info, max_pixels=1000)
    assert e.value.category == "too large"
    monkeypatch.setattr(video, "MAX_IMAGE_PIXELS", 1000)   # a default below the file: the flag raised above it
    assert video.decode(*args, media=info, max_pixels=2048).shape == (3, H, W, 3)
    assert video.decode(*args, max_pixels=2048).shape == (3, H, W, 3)   # probed inside the decode


def write_float_tiff(path: Path, rgb: np.ndarray) -> Path:
    """A baseline TIFF of float32 RGB samples (SampleFormat 3, uncompressed, one strip), written
    byte by byte from the TIFF 6.0 spec: Pillow has no mode for 3 x 32-bit float."""
    import struct

    h, w, c = rgb.shape
    data = np.ascontiguousarray(rgb, dtype="<f4").tobytes()
    bits_at = 8 + len(data)
    format_at = bits_at + 2 * c
    ifd_at = format_at + 2 * c
    # (tag, type 3 = SHORT / 4 = LONG, count, value or offset)
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, bits_at), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8), (277, 3, 1, c), (278, 4, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1),
               (339, 3, c, format_at)]
    out = b"II*\x00" + struct.pack("<I", ifd_at) + data + struct.pack(f"<{c}H", *[32] * c)
    out += struct.pack(f"<{c}H", *[3] * c) + struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        out += struct.pack("<HHIHH" if typ == 3 and count == 1 else "<HHII", tag, typ, count,
                           *((value, 0) if typ == 3 and count == 1 else (value,)))
    path.write_bytes(out + struct.pack("<I", 0))
    return path


def test_a_still_only_ffmpeg_reads_is_an_image(tmp_path: Path) -> None:
    """A float32 TIFF: Pillow cannot open it, FFmpeg reads it as one frame -> an image sample
    (decoder pyav), not "a video, not an image"; its pixels are the float values x 255."""
    rgb = np.random.default_rng(0).random((48, 80, 3)).astype(np.float32)
    rgb[:24, :40] = [1.0, 0.0, 0.25]
    path = write_float_tiff(tmp_path / "float.tif", rgb)
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(path)
    info = probe(path, "image")
    assert (info.frames, info.height, info.width, info.decoder) == (1, 48, 80, "pyav")
    out = decode_image(path, (48, 80), (0, 0, 48, 80), media=info)
    assert out.shape == (1, 48, 80, 3) and out.dtype == np.uint8
    assert np.abs(out[0].astype(float) - rgb * 255).max() <= 2.0
    assert out[0, 5, 5].tolist() == [255, 0, 64]
    assert np.array_equal(decode_image(path, (48, 80), (0, 0, 48, 80)), out)   # probed inside the decode
    with pytest.raises(MediaError, match=r"^image too large: 48x80 \(HxW\) = 3,840 pixels") as e:
        probe(path, "image", max_pixels=1000)
    assert e.value.category == "too large"

    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps([{"file_path": "float.tif", "text": "noise", "type": "image"}]))
    sources, _ = load_sources(meta, tmp_path)
    plans, skipped, by_key = probe_and_plan(sources, Sampling(video_sample_size=32, image_sample_size=32),
                                            progress=False)
    assert not skipped and [p.kind for p in plans] == ["image"]
    assert media_report(by_key.values())["decoders"] == {"pyav": ["float.tif"]}
