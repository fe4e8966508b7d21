"""cogfun.video: probing and decoding of the synthetic dataset, and the reasons for bad inputs.

Decoded frames are identified by their nearest source frame (:func:`cogfun.tiny.synthetic_frames`
regenerates them exactly): distinct source frames differ by an RMS of > 19 grey levels while
H.264 (crf 12, 4:2:0 chroma) leaves < 8, so "nearest" is unambiguous. Resize/crop geometry is checked the same
way against PIL-resized source frames, where a crop shifted by 4 px is clearly farther.
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cogfun.tiny import (
    synthetic_clips,
    synthetic_frames,
    synthetic_images,
    write_bad_dataset,
    write_synthetic_dataset,
)
from cogfun.video import (
    MediaError,
    MediaInfo,
    decode_image,
    decode_video,
    frames_to_tensor,
    probe,
    probe_image,
    probe_video,
)

N_FRAMES = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = write_synthetic_dataset(tmp_path_factory.mktemp("ds"), seed=0, n_frames=N_FRAMES)
    return meta.parent


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bad_dataset(tmp_path_factory.mktemp("bad")).parent


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()))


def _resize(frame: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))


def test_metadata_rows(dataset: Path) -> None:
    rows = json.loads((dataset / "metadata.json").read_text())
    clips, images = synthetic_clips(n_frames=N_FRAMES), synthetic_images()
    assert [r["file_path"] for r in rows] == [c.file_path for c in clips + images]
    assert [r["type"] for r in rows] == ["video"] * len(clips) + ["image"] * len(images)
    assert all(isinstance(r["text"], str) and r["text"] for r in rows)
    for r in rows:
        assert not Path(r["file_path"]).is_absolute() and (dataset / r["file_path"]).is_file()
    ratios = [c.height / c.width for c in clips]
    assert max(ratios) > 1 and min(ratios) <= 1 / 3 and 1.0 in ratios  # portrait, >= 3:1 wide, square
    assert {c.frames for c in clips} >= {6, N_FRAMES}
    assert max(len(r["text"].split()) for r in rows) > 226  # one caption needs truncation


def test_synthetic_dataset_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    again = write_synthetic_dataset(tmp_path, seed=0, n_frames=N_FRAMES).parent
    for row in json.loads((dataset / "metadata.json").read_text()):
        assert (again / row["file_path"]).read_bytes() == (dataset / row["file_path"]).read_bytes(), row
    assert (again / "metadata.json").read_text() == (dataset / "metadata.json").read_text()


def test_probe_videos_match_what_was_written(dataset: Path) -> None:
    for clip in synthetic_clips(n_frames=N_FRAMES):
        info = probe(dataset / clip.file_path, "video")
        assert info == MediaInfo(frames=clip.frames, fps=float(clip.fps), height=clip.height, width=clip.width,
                                 decoder="decord", stream=0)
        assert probe_video(str(dataset / clip.file_path)) == info  # str paths too


def test_probe_images_match_what_was_written(dataset: Path) -> None:
    for image in synthetic_images():
        info = probe(dataset / image.file_path, "image")
        assert info == MediaInfo(frames=1, fps=0.0, height=image.height, width=image.width, decoder="pillow")


def test_probe_rejects_unknown_kind(dataset: Path) -> None:
    with pytest.raises(ValueError, match="unknown media kind"):
        probe(dataset / "videos/short.mp4", "audio")


def test_scale_multiplies_sizes(tmp_path: Path) -> None:
    meta = write_synthetic_dataset(tmp_path, n_frames=9, scale=2)
    rows = json.loads(meta.read_text())
    assert probe(tmp_path / rows[0]["file_path"], "video") == MediaInfo(9, 24.0, 192, 320, "decord", 0)
    assert probe(tmp_path / rows[-1]["file_path"], "image").height == 160


@pytest.mark.parametrize("name", ["landscape", "portrait", "square", "wide", "short"])
def test_decode_returns_the_requested_frames(dataset: Path, name: str) -> None:
    clip = next(c for c in synthetic_clips(n_frames=N_FRAMES) if c.file_path == f"videos/{name}.mp4")
    source = synthetic_frames(clip.height, clip.width, clip.frames, seed=clip.seed)
    # out of order, a repeat, both ends
    indices = [clip.frames - 1, 0, 2, clip.frames // 2, 2]
    full = (clip.height, clip.width)
    frames = decode_video(dataset / clip.file_path, indices, full, (0, 0, *full))
    assert frames.dtype == np.uint8 and frames.shape == (len(indices), *full, 3)
    for got, want in zip(frames, indices):
        errors = [_rmse(got, s) for s in source]
        assert int(np.argmin(errors)) == want
        assert errors[want] < 10.0 and sorted(errors)[1] > 15.0, (errors[want], sorted(errors)[1])
    assert np.array_equal(frames[2], frames[4])
    assert _rmse(frames[0], frames[1]) > 15.0


def test_decode_resize_and_crop_geometry(dataset: Path) -> None:
    clip = next(c for c in synthetic_clips(n_frames=N_FRAMES) if c.file_path == "videos/landscape.mp4")
    source = synthetic_frames(clip.height, clip.width, clip.frames, seed=clip.seed)
    resize_hw = (72, 120)  # 96x160 -> 0.75x
    crop = (8, 20, 64, 64)  # top, left, height, width
    frames = decode_video(dataset / clip.file_path, [1, 5], resize_hw, crop)
    assert frames.shape == (2, 64, 64, 3)
    for got, i in zip(frames, [1, 5]):
        ref = _resize(source[i], resize_hw)
        right = _rmse(got, ref[8:72, 20:84])
        shifted = _rmse(got, ref[8:72, 24:88])
        assert right < 10.0 and shifted > 2 * right, (right, shifted)
    # upscaling to a cover size larger than the source works too
    up = decode_video(dataset / clip.file_path, [0], (192, 320), (32, 0, 128, 320))
    assert up.shape == (1, 128, 320, 3)
    assert _rmse(up[0], _resize(source[0], (192, 320))[32:160]) < 10.0


def test_decode_image_geometry(dataset: Path) -> None:
    image = synthetic_images()[0]  # portrait PNG 144x96
    source = synthetic_frames(image.height, image.width, 1, seed=image.seed)[0]
    out = decode_image(dataset / image.file_path, (144, 96), (0, 0, 144, 96))
    assert out.shape == (1, 144, 96, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0], source)  # PNG is lossless, no resize: exact
    out = decode_image(dataset / image.file_path, (96, 64), (16, 0, 64, 64))
    assert out.shape == (1, 64, 64, 3)
    assert np.array_equal(out[0], _resize(source, (96, 64))[16:80])
    jpeg = synthetic_images()[1]
    out = decode_image(dataset / jpeg.file_path, (jpeg.height, jpeg.width), (0, 0, jpeg.height, jpeg.width))
    assert _rmse(out[0], synthetic_frames(jpeg.height, jpeg.width, 1, seed=jpeg.seed)[0]) < 10.0


def test_image_exif_orientation(tmp_path: Path) -> None:
    pixels = synthetic_frames(40, 60, 1, seed=3)[0]  # stored 40 high, 60 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    assert probe_image(path) == MediaInfo(frames=1, fps=0.0, height=60, width=40, decoder="pillow")
    out = decode_image(path, (60, 40), (0, 0, 60, 40))
    assert out.shape == (1, 60, 40, 3)
    assert _rmse(out[0], np.rot90(pixels, k=-1)) < 10.0


def test_rgba_and_grey_images_become_rgb(tmp_path: Path) -> None:
    Image.new("RGBA", (20, 10), (10, 20, 30, 128)).save(tmp_path / "a.png")
    Image.new("L", (20, 10), 77).save(tmp_path / "g.png")
    assert decode_image(tmp_path / "a.png", (10, 20), (0, 0, 10, 20))[0, 0, 0].tolist() == [10, 20, 30]
    assert decode_image(tmp_path / "g.png", (10, 20), (0, 0, 10, 20))[0, 0, 0].tolist() == [77, 77, 77]


def test_caller_mistakes_raise_value_error(dataset: Path) -> None:
    path = dataset / "videos/short.mp4"  # 6 frames, 64x112
    with pytest.raises(ValueError, match="out of range"):
        decode_video(path, [0, 6], (64, 112), (0, 0, 64, 112))
    with pytest.raises(ValueError, match="out of range"):
        decode_video(path, [-1], (64, 112), (0, 0, 64, 112))
    with pytest.raises(ValueError, match="does not fit"):
        decode_video(path, [0], (64, 112), (8, 0, 64, 112))
    with pytest.raises(ValueError, match="does not fit"):
        decode_image(dataset / "images/square.png", (80, 80), (0, 0, 0, 80))
    with pytest.raises(ValueError, match="empty"):
        decode_video(path, [], (64, 112), (0, 0, 64, 112))


def test_frames_to_tensor() -> None:
    frames = np.zeros((2, 3, 4, 3), np.uint8)
    frames[0, 0, 0] = [0, 255, 51]
    frames[1, 2, 3] = [255, 0, 204]
    t = frames_to_tensor(frames)
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, 2, 3, 4)
    assert t[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 1.0, -0.6])
    assert t[:, 1, 2, 3].tolist() == pytest.approx([1.0, -1.0, 0.6])
    assert t.min() == -1.0 and t.max() == 1.0
    assert torch.equal(t[:, 1, 0, 0], torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(frames.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(frames[..., :2])


# --------------------------------------------------------------------------------------------
# bad inputs


def test_bad_dataset_rows(bad: Path) -> None:
    rows = json.loads((bad / "metadata.json").read_text())
    assert len(rows) == 10
    assert sum("file_path" not in r for r in rows) == 1
    assert sum("text" not in r for r in rows) == 1
    assert [r["type"] for r in rows].count("audio") == 1
    good = rows[:2]
    assert probe(bad / good[0]["file_path"], "video") == MediaInfo(12, 24.0, 64, 96, "decord", 0)
    assert probe(bad / good[1]["file_path"], "image") == MediaInfo(1, 0.0, 64, 64, "pillow")


@pytest.mark.parametrize(
    ("file_path", "kind", "reason"),
    [
        ("videos/missing.mp4", "video", r"^file not found$"),
        ("videos/empty.mp4", "video", r"^empty file \(0 bytes\)$"),
        ("videos/corrupt.mp4", "video", r"^cannot decode video: Invalid data found when processing input$"),
        ("images/garbage.png", "image", r"^cannot read image: cannot identify image file$"),
        ("images/good.png", "video", r"^a still PNG image \(64x64 HxW\), not a video: list it with type 'image'$"),
        ("videos/good.mp4", "image", r"^cannot read image: a video \(h264, 64x96 HxW\), not an image: list it with "
                                     r"type 'video'$"),
        ("videos", "video", r"^not a regular file$"),
    ],
)
def test_bad_media_give_media_error_with_reason(bad: Path, file_path: str, kind: str, reason: str) -> None:
    with pytest.raises(MediaError, match=reason) as info:
        probe(bad / file_path, kind)
    assert info.value.reason == str(info.value)
    assert info.value.path == str(bad / file_path)
    # decoding fails the same way
    with pytest.raises(MediaError, match=reason):
        if kind == "video":
            decode_video(bad / file_path, [0], (8, 8), (0, 0, 8, 8))
        else:
            decode_image(bad / file_path, (8, 8), (0, 0, 8, 8))


def test_two_frame_video_probes_as_two_frames(bad: Path) -> None:
    """Decodable but too short: the probe reports it, the planner decides to skip it."""
    assert probe(bad / "videos/two_frames.mp4", "video") == MediaInfo(2, 24.0, 64, 64, "decord", 0)
    assert decode_video(bad / "videos/two_frames.mp4", [0, 1], (64, 64), (0, 0, 64, 64)).shape == (2, 64, 64, 3)


def test_truncated_files(bad: Path, tmp_path: Path) -> None:
    data = (bad / "videos/good.mp4").read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])  # mdat cut, moov (at the end) lost
    with pytest.raises(MediaError, match="^cannot decode video: "):
        probe_video(tmp_path / "half.mp4")
    png = (bad / "images/good.png").read_bytes()
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(MediaError, match="^cannot read image: "):
        probe_image(tmp_path / "half.png")
    with pytest.raises(MediaError, match="^cannot read image: "):
        decode_image(tmp_path / "half.png", (64, 64), (0, 0, 64, 64))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses glibc pthread mutexes via ctypes")
def test_a_signal_interrupts_a_stuck_decode(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the decode work is stuck in C, the calling thread still runs its SIGALRM handler.

    The stand-in for a hung decord call blocks in pthread_mutex_lock, which (unlike sleep or
    read) does not return on a signal: called on the main thread it would hold the handler back
    until the mutex is released 3 s later.
    """
    import cogfun.video as video

    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # all zero == PTHREAD_MUTEX_INITIALIZER on glibc
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        libc.pthread_mutex_lock(mutex)
        held.set()
        release.wait(3.0)
        libc.pthread_mutex_unlock(mutex)

    def stuck(*args: object) -> None:
        libc.pthread_mutex_lock(mutex)  # ctypes releases the GIL; blocks until holder() lets go
        libc.pthread_mutex_unlock(mutex)

    class Timeout(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Timeout

    monkeypatch.setattr(video, "_decode_video", stuck)
    owner = threading.Thread(target=holder)
    owner.start()
    held.wait(5.0)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Timeout):
            decode_video(dataset / "videos/short.mp4", [0], (64, 112), (0, 0, 64, 112))
        elapsed = time.monotonic() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        owner.join()
    assert elapsed < 1.5, f"the handler ran only after {elapsed:.1f} s"
