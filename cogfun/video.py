"""Probe and decode training media: what FFmpeg or an image library reads becomes frames.

Decoders (``MediaInfo.decoder``; the probe picks one per file and the decode uses it):

* ``decord`` (the default for videos, as in CogVideoX-Fun): mp4/mov-style files whose container
  states the frame count, 8 bits per sample, in a codec decord's own FFmpeg reads (and counts the
  same way).
* ``pyav`` (FFmpeg through PyAV): everything else FFmpeg reads (AV1, Theora, MPEG-1/2 program
  streams, FLIC, VP9/H.264 in Matroska/WebM, ...), files where decord fails at the probe or in the
  middle of a decode, files with several video streams where decord would pick another, and
  10/12-bit video (iPhone HEVC, HDR): decord converts it through 8 bits, measured 26 % further off
  the source than PyAV (RMSE 13.8 vs 11.0 on the test clip).
  Frames are counted by demuxing the stream (no decoding), and frame ``i`` is the ``i``-th frame in
  presentation order (the rank of its timestamp), which is also decord's numbering; a decode
  starts at the keyframe before the first frame it needs (bench/decode.py: as fast as decord).
* ``pillow`` (images, and animated GIF / APNG / animated WebP listed as videos: Pillow composites
  their frames) and ``pillow-heif`` (HEIC/HEIF photos through the pillow-heif plugin; Pillow reads
  AVIF itself).
* ``pyav`` for images, too: a still Pillow cannot identify that FFmpeg reads as one frame (a
  float32 TIFF, EXR, DPX, ...) is an image read by FFmpeg, converted to 8-bit RGB by swscale.

The real picture stream of a file with several video streams is the largest colour stream that
is not an attached picture (cover art), a thumbnail or a still; an audio-only file, or one with only
cover art, has "no video stream".

Orientation. Images honour their EXIF orientation; videos their display matrix (the rotation a
phone writes), flips included. decord rotates by the matrix itself but ignores flips, so a flipped
file is read with PyAV. Probe and decode agree: the probed size is the displayed (upright) size.

Every problem with a media file surfaces as :class:`MediaError` carrying a short human reason and a
``category`` for the counts in reports ("no video stream", "zero frames", "too large", "corrupt",
...). Mistakes of the caller (a crop outside the resized frame, a frame index past the end) raise
``ValueError`` instead: they are bugs, not bad data.

Damaged files that still hold every pixel load, with a warning in ``MediaInfo.note`` (and in the
reports): a JPEG missing its end marker (it decodes the same whatever follows the cut, i.e. no
entropy-coded data is missing), or a PNG failing Pillow's structural check whose pixels all decode.

Resizing. Frames are decoded at full resolution and resized with PIL bicubic (antialiased when
downscaling), then cropped. decord can resize at decode time (``VideoReader(width=, height=)``,
FFmpeg's scaler working on the 4:2:0 frame) and is faster when upscaling, but measured against a
Lanczos resize of the source frames it was about twice as far off (RMSE 11.6 vs 6.0 at 2x down, 10.6
vs 5.9 at 1.8x, 7.6 vs 4.8 at 2x up, on a textured clip), so the slower, better path was picked.
This also matches CogVideoX-Fun, which decodes full frames and resizes afterwards. PyAV converts to
RGB with the same swscale call as decord: on the same H.264 file both give identical pixels.

Hangs. decord's calls go through ctypes, which releases the GIL, but a Python signal handler only
runs when the main thread is back in the interpreter, so a C call stuck in the main thread would
defer a caller's SIGALRM timeout forever. The decoding work therefore runs in a short-lived helper
thread while the calling thread waits on a join that signals interrupt: a caller's SIGALRM handler
fires on time and may raise. A truly hung helper thread (daemon) is abandoned, not stopped.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
from bisect import bisect_left
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import av
import decord
import numpy as np
import pillow_heif
from decord._ffi.base import DECORDError, DECORDLimitReachedError
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = [
    "MediaError",
    "MediaInfo",
    "DEFAULT_DECODER",
    "MAX_IMAGE_PIXELS",
    "probe",
    "probe_video",
    "probe_image",
    "decode",
    "decode_video",
    "decode_image",
    "frames_to_tensor",
    "write_mp4",
]

PathLike = str | os.PathLike[str]
T = TypeVar("T")

pillow_heif.register_heif_opener()  # HEIC/HEIF (the iPhone default) through Image.open; AVIF is Pillow's own
# Pillow's decompression-bomb limit, applied here per call (`max_pixels`, the --max_image_pixels
# flag) with the image's size in the reason; Pillow's process-wide check (a warning above its
# limit, an error above twice it) is turned off so that the flag alone decides.
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
Image.MAX_IMAGE_PIXELS = None

DEFAULT_DECODER = {"video": "decord", "image": "pillow"}
# What this cogfun can read, recorded in a shard dir's manifest: a finished shard dir whose manifest
# records a lower value retries the sources it skipped (cogfun.dataset.retry_skipped). Raise it when
# cogfun learns to read files it skipped before. Every dir made before the value was recorded (shard
# format 1) fails the fingerprint anyway, so the retry matters from the next raise on.
# 1: decord + Pillow; 2: + PyAV, animations, HEIF, damaged JPEGs, display-matrix orientation;
# 3: + stills only FFmpeg reads (float TIFF, ...), read as images.
MEDIA_READERS = 3

# Errors decord raises from its C++ side (DECORDError), from its Python wrapper when FFmpeg
# cannot open the input (RuntimeError "Error reading <path>...") and when the frame count is 0
# (AssertionError in VideoReader.__init__).
_DECORD_ERRORS = (DECORDError, DECORDLimitReachedError, RuntimeError, AssertionError)
# What PIL (and pillow-heif) raise for unreadable, truncated or hostile images.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, Image.DecompressionBombError)
_AV_ERRORS = (av.error.FFmpegError,)

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations that swap width and height (rotations by 90 / 270 degrees, transposes).
_EXIF_TRANSPOSED = {5, 6, 7, 8}
# EXIF orientation -> the PIL transpose that displays it upright (as ImageOps.exif_transpose does).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# A video display matrix as (swap axes, flip rows, flip columns) -> the same EXIF orientation code.
_MATRIX_ORIENTATION = {(False, False, False): 1, (False, False, True): 2, (False, True, True): 3,
                       (False, True, False): 4, (True, False, False): 5, (True, False, True): 6,
                       (True, True, True): 7, (True, True, False): 8}
_ROTATION_ORIENTATION = {0: 1, 90: 8, 180: 3, -180: 3, -90: 6}  # PyAV's counter-clockwise degrees
_DECORD_ORIENTATIONS = {1, 3, 6, 8}  # decord applies pure rotations itself, but not flips

# FFmpeg demuxers of single images and animations: these files are read with Pillow.
_IMAGE_DEMUXERS = {"gif", "apng", "image2", "webp_pipe", "png_pipe", "jpeg_pipe", "gif_pipe"}
_ANIMATED_FORMATS = {"GIF", "PNG", "WEBP", "AVIF", "FLI"}  # Pillow formats that may hold animations
_SKIPPED_DISPOSITIONS = ("attached_pic", "timed_thumbnails", "still_image")
_GRAY_FORMATS = ("gray", "ya", "monob", "monow")  # alpha-only / depth side streams of a colour one


class MediaError(Exception):
    """A media file cannot be used; ``reason`` says why in a few words, ``category`` groups
    reasons for counting ("not found", "no video stream", "zero frames", "too large", "corrupt"...)."""

    def __init__(self, reason: str, path: PathLike | None = None, *, category: str = "corrupt") -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.category = category
        super().__init__(reason)  # str(e) is the reason alone: callers log it next to the path


@dataclass(frozen=True)
class MediaInfo:
    """What a probe learns without decoding the whole file (images: frames=1, fps=0.0), and how
    the decode must read it. ``height`` x ``width`` is the displayed (upright) size."""

    frames: int
    fps: float
    height: int
    width: int
    decoder: str = "decord"   # decord | pyav | pillow | pillow-heif
    stream: int = -1          # the video stream read (pyav; -1 for images and animations)
    orientation: int = 1      # EXIF orientation code of the stored frames (videos: from the display matrix)
    note: str = ""            # a warning for the reports (e.g. a truncated JPEG that loaded whole)


def _interruptible(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a helper thread; the caller waits in ``Thread.join``, which a signal
    interrupts (POSIX), so the caller's signal handlers run even while decord or PIL are stuck."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - relayed to the calling thread and re-raised there
            box["error"] = e

    worker = threading.Thread(target=target, name="cogfun-media", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _check_file(path: PathLike) -> Path:
    """Fail with a precise reason when ``path`` is not a non-empty regular file."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise MediaError("file not found", p, category="not found") from None
    except OSError as e:
        raise MediaError(f"cannot access file: {e.strerror or e}", p, category="unreadable") from None
    if not p.is_file():
        raise MediaError("not a regular file", p, category="unreadable")
    if st.st_size == 0:
        raise MediaError("empty file (0 bytes)", p, category="empty file")
    if not os.access(p, os.R_OK):
        raise MediaError("permission denied", p, category="unreadable")
    return p


def _short(message: str, path: Path | None = None, limit: int = 200) -> str:
    """Tidy a library message: one line, no decord time / source-location prefix, no repeated path."""
    if path is not None:
        message = message.replace(f"'{path}'", "").replace(str(path), "")
    message = " ".join(message.split()).rstrip(" :")
    if "] " in message and message.startswith("["):
        message = message.split("] ", 1)[1]
    message = re.sub(r"^\S+\.(cc|h):\d+: ", "", message)
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _av_message(e: BaseException) -> str:
    return _short(str(getattr(e, "strerror", None) or e))


# ----------------------------------------------------------------------------------------------
# videos: probing


def probe_video(path: PathLike, *, num_threads: int = 1, max_pixels: int = MAX_IMAGE_PIXELS) -> MediaInfo:
    """Frame count, average fps, displayed size and the decoder to use, decoding one frame."""
    p = _check_file(path)
    return _interruptible(lambda: _probe_video(p, num_threads, max_pixels))


def _probe_video(p: Path, num_threads: int, max_pixels: int) -> MediaInfo:
    try:
        container = av.open(str(p))
    except _AV_ERRORS as e:
        try:  # a format FFmpeg does not know but Pillow does (an animation)
            return _probe_animation(p, max_pixels)
        except MediaError:
            raise MediaError(f"cannot decode video: {_av_message(e)}", p) from e
    with container:
        if container.format.name in _IMAGE_DEMUXERS:
            return _probe_animation(p, max_pixels)
        stream = _pick_stream(container, p)
        first = _first_frame(container, stream, p)
        orientation = _orientation(first)
        deep = any(c.bits > 8 for c in first.format.components)
        height, width = _displayed(first.height, first.width, orientation)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        several = sum(1 for s in container.streams.video if _is_picture(s)) > 1
        stated = stream.frames
        info = MediaInfo(frames=stated, fps=fps, height=height, width=width, decoder="decord",
                         stream=stream.index, orientation=orientation)
    if stated > 1 and not deep and orientation in _DECORD_ORIENTATIONS and _decord_agrees(p, info, several,
                                                                                           num_threads):
        return info
    frames, fps = _count_frames(p, info.stream)
    if frames == 0:
        raise MediaError("cannot decode video: the video stream has no frames", p, category="zero frames")
    if frames == 1:
        _refuse_still(p)
    return replace(info, frames=frames, fps=info.fps or fps, decoder="pyav")


def _is_picture(s: av.video.stream.VideoStream) -> bool:
    return not any(s.disposition & getattr(av.stream.Disposition, d) for d in _SKIPPED_DISPOSITIONS)


def _pick_stream(container: av.container.InputContainer, p: Path) -> av.video.stream.VideoStream:
    """The real picture stream: not cover art / thumbnails / stills, colour before grey (alpha or
    depth side streams), then the most pixels, then the most frames, then the first."""
    pictures = [s for s in container.streams.video if _is_picture(s)]
    if not pictures:
        others = [s.codec_context.name for s in container.streams if s.type == "audio"]
        what = f"audio only: {', '.join(others)}" if others else "nothing FFmpeg can show"
        if container.streams.video:
            what += "; a cover image is not a video"
        raise MediaError(f"cannot decode video: no video stream ({what})", p, category="no video stream")
    colour = [s for s in pictures if not str(s.codec_context.pix_fmt or "").startswith(_GRAY_FORMATS)] or pictures
    return max(colour, key=lambda s: (s.width * s.height, s.frames, -s.index))


def _first_frame(container: av.container.InputContainer, stream, p: Path) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except _AV_ERRORS as e:
        raise MediaError(f"cannot decode video: first frame unreadable ({_av_message(e)})", p) from e
    raise MediaError("cannot decode video: the video stream has no frames", p, category="zero frames")


def _orientation(frame: av.VideoFrame) -> int:
    """EXIF-style orientation code of a frame's display matrix (1 when it has none).

    The matrix (libavutil/display.h) maps a stored pixel (x, y) to x' = a x + c y, y' = b x + d y.
    The displayed frame is the stored one with its axes swapped when a = d = 0, then its rows and
    columns reversed by the signs; this is the transpose / flip FFmpeg's own autorotation inserts
    (a rotation of 90 degrees counter-clockwise has b < 0 < c)."""
    try:
        data = frame.side_data.get("DISPLAYMATRIX") if len(frame.side_data) else None
    except ValueError:  # side data of a type this PyAV cannot name: the rotation alone (no flips)
        return _ROTATION_ORIENTATION.get(frame.rotation, 1)
    if data is None:
        return 1
    a, b, _, c, d, *_ = struct.unpack("=9i", bytes(data))
    if a == d == 0 and b and c:
        key = (True, b < 0, c < 0)
    elif b == c == 0 and a and d:
        key = (False, d < 0, a < 0)
    else:
        return 1  # not a multiple of 90 degrees: shown as stored
    return _MATRIX_ORIENTATION[key]


def _displayed(height: int, width: int, orientation: int) -> tuple[int, int]:
    return (width, height) if orientation in _EXIF_TRANSPOSED else (height, width)


def _decord_agrees(p: Path, info: MediaInfo, several: bool, num_threads: int) -> bool:
    """Whether decord opens the file and sees what FFmpeg sees: the stated frame count (and, when
    the file has several picture streams, the same stream, by its first frame's size)."""
    try:
        reader = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=num_threads)
        if len(reader) != info.frames:
            return False
        if several:
            first = _as_numpy(reader.next())
            return first.shape == (info.height, info.width, 3)
        return True
    except (StopIteration, *_DECORD_ERRORS):
        return False


def _count_frames(p: Path, index: int) -> tuple[int, float]:
    """Frames of a stream by demuxing it (no decoding), and their rate from the timestamps."""
    pts: list[int] = []
    try:
        with av.open(str(p)) as container:
            stream = container.streams[index]
            for packet in container.demux(stream):
                if packet.size:
                    pts.append(packet.pts)
            base = stream.time_base
    except _AV_ERRORS as e:
        raise MediaError(f"cannot decode video: {_av_message(e)}", p) from e
    fps = 0.0
    if len(pts) > 1 and None not in pts and base and max(pts) > min(pts):
        fps = float((len(pts) - 1) / ((max(pts) - min(pts)) * Fraction(base)))
    return len(pts), fps


def _refuse_still(p: Path) -> None:
    """A one-frame "video" that an image library opens: say it is a still image."""
    try:
        with Image.open(p) as img:
            what = f"a still {img.format} image ({img.height}x{img.width} HxW)"
    except _PIL_ERRORS:
        return
    raise MediaError(f"{what}, not a video: list it with type 'image'", p, category="not a video")


def _probe_animation(p: Path, max_pixels: int) -> MediaInfo:
    """An animated GIF / APNG / WebP (or AVIF, FLIC) as a video, frame timing from the file."""
    with _open_image(p, max_pixels) as img:
        n = getattr(img, "n_frames", 1)
        if n <= 1 or img.format not in _ANIMATED_FORMATS:
            raise MediaError(f"a still {img.format} image ({img.height}x{img.width} HxW), not a video: "
                             f"list it with type 'image'", p, category="not a video")
        total_ms = 0.0
        try:
            for i in range(n):
                img.seek(i)
                if "duration" not in img.info:
                    img.load()  # (WebP sets a frame's duration when it decodes it)
                total_ms += float(img.info.get("duration") or 0)
        except _PIL_ERRORS as e:
            raise MediaError(f"cannot decode video: frame {i} unreadable ({_short(str(e), p)})", p) from e
        width, height = img.size
    # browsers show frames without a delay at 10 fps
    fps = n / (total_ms / 1000.0) if total_ms > 0 else 10.0
    return MediaInfo(frames=n, fps=fps, height=height, width=width, decoder="pillow")


# ----------------------------------------------------------------------------------------------
# images: probing


def _open_image(p: Path, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(p)
    except Image.UnidentifiedImageError as e:
        video = _not_an_image(p)
        raise MediaError(f"cannot read image: {video or _short(str(e), p)}", p,
                         category="not an image" if video else "corrupt") from e
    except _PIL_ERRORS as e:
        raise MediaError(f"cannot read image: {_short(str(e), p)}", p) from e
    if img.width * img.height > max_pixels:
        img.close()
        _refuse_too_large(img.height, img.width, max_pixels, p)
    return img


def _refuse_too_large(height: int, width: int, max_pixels: int, p) -> None:
    raise MediaError(
        f"image too large: {height}x{width} (HxW) = {width * height:,} pixels, above the "
        f"decompression-bomb limit of {max_pixels:,} (raise it with --max_image_pixels)", p,
        category="too large")


def _not_an_image(p: Path) -> str | None:
    """When Pillow cannot identify a file, whether FFmpeg sees a video in it."""
    try:
        with av.open(str(p)) as container:
            if container.format.name in _IMAGE_DEMUXERS:
                return None
            for s in container.streams.video:
                if _is_picture(s):
                    return (f"a video ({s.codec_context.name}, {s.height}x{s.width} HxW), not an image: "
                            f"list it with type 'video'")
            audio = [s.codec_context.name for s in container.streams.audio]
            if audio:
                return f"an audio file ({', '.join(audio)}), not an image"
    except _AV_ERRORS:
        pass
    return None


def probe_image(path: PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> MediaInfo:
    """Size of an image after EXIF orientation; the header is read and checked, pixels are not
    (except for a JPEG without its end marker, or a file failing the structural check)."""
    p = _check_file(path)
    return _interruptible(lambda: _probe_image(p, max_pixels))


def _probe_image(p: Path, max_pixels: int) -> MediaInfo:
    problem = None
    try:
        img = _open_image(p, max_pixels)
    except MediaError as e:
        if not isinstance(e.__cause__, Image.UnidentifiedImageError):
            raise
        return _ffmpeg_still(p, max_pixels, e)[0]   # a still only FFmpeg reads (e.g. a float TIFF)
    with img:
        fmt = img.format
        if fmt not in ("JPEG", "MPO"):  # (a JPEG has no structural check: its end marker is looked at)
            try:
                img.verify()  # structural check (PNG chunk CRCs etc.) without decoding the pixels
            except _PIL_ERRORS as e:
                problem = e
    with _open_image(p, max_pixels) as img:  # verify() leaves the image unusable: open it again
        try:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        except _PIL_ERRORS as e:
            raise MediaError(f"cannot read image: {_short(str(e), p)}", p) from e
    note = ""
    if problem is not None or (fmt in ("JPEG", "MPO") and not _ends_with_eoi(p)):
        note = _load_rgb(p, max_pixels)[1]  # decodes the pixels: loads with a warning, or raises
        if problem is not None and not note:
            note = f"damaged file ({_short(str(problem), p)}) but every pixel decodes"
    if width <= 0 or height <= 0:
        raise MediaError(f"cannot read image: invalid size {height}x{width} (HxW)", p)
    height, width = _displayed(height, width, orientation if orientation in _UPRIGHT else 1)
    decoder = "pillow-heif" if fmt == "HEIF" else "pillow"
    return MediaInfo(frames=1, fps=0.0, height=height, width=width, decoder=decoder, note=note)


def _ffmpeg_still(p: Path, max_pixels: int, pillow_error: MediaError) -> tuple[MediaInfo, np.ndarray]:
    """An image Pillow cannot identify that FFmpeg reads as one frame (a float32 or 16-bit-float
    TIFF, an EXR, a DPX, ...): its probe (decoder "pyav") and its RGB frame, upright. A file that
    is no still (a video, audio, nothing FFmpeg knows) raises ``pillow_error``, whose reason says
    what the file is."""
    try:
        with av.open(str(p)) as container:
            pictures = [s for s in container.streams.video if _is_picture(s)]
            if not pictures:
                raise pillow_error
            stream = _pick_stream(container, p)
            index = stream.index
            first = _first_frame(container, stream, p)
        frames, _ = _count_frames(p, index)
    except (MediaError, *_AV_ERRORS):   # FFmpeg cannot read it either: Pillow's reason stands
        raise pillow_error from None
    if frames != 1:
        raise pillow_error   # "a video (...), not an image: list it with type 'video'"
    if first.width * first.height > max_pixels:
        _refuse_too_large(first.height, first.width, max_pixels, p)
    try:
        rgb = first.to_ndarray(format="rgb24")
    except _AV_ERRORS as e:
        raise MediaError(f"cannot read image: {_av_message(e)}", p) from e
    orientation = _orientation(first)
    height, width = _displayed(first.height, first.width, orientation)
    info = MediaInfo(frames=1, fps=0.0, height=height, width=width, decoder="pyav", stream=index,
                     orientation=orientation)
    return info, rgb


def _ends_with_eoi(p: Path) -> bool:
    with open(p, "rb") as fh:
        fh.seek(-2, os.SEEK_END)
        return fh.read(2) == b"\xff\xd9"


def _load_rgb(p: Path, max_pixels: int) -> tuple[Image.Image, str]:
    """The image upright, in RGB, and a warning for the report ("" when the file is sound)."""
    with _open_image(p, max_pixels) as img:
        fmt = img.format
        try:
            return _upright(img, int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))).convert("RGB"), ""
        except _PIL_ERRORS as e:
            error = e
    if fmt in ("JPEG", "MPO"):
        salvaged = _complete_jpeg(p.read_bytes())
        if salvaged is not None:
            return salvaged, f"truncated JPEG: its end marker is missing but every row decodes ({_short(str(error))})"
    raise MediaError(f"cannot read image: {_short(str(error), p)}", p) from error


def _complete_jpeg(data: bytes) -> Image.Image | None:
    """A truncated JPEG decoded with an end marker appended, if no entropy-coded data is missing:
    then the decoder finishes the same whatever follows the cut (here: the marker alone, or junk
    bytes and the marker); a cut inside the scan data decodes the junk into the missing rows."""
    data = data.rstrip(b"\xff")
    decoded = []
    for tail in (b"\xff\xd9", b"\x5a\xa5" * 64 + b"\xff\xd9"):
        try:
            with Image.open(io.BytesIO(data + tail)) as img:
                decoded.append(_upright(img, int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))).convert("RGB"))
        except _PIL_ERRORS:
            return None
    a, b = decoded
    return a if np.array_equal(np.asarray(a), np.asarray(b)) else None


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    method = _UPRIGHT.get(orientation)
    return img.transpose(method) if method is not None else img


def probe(path: PathLike, kind: str, *, max_pixels: int = MAX_IMAGE_PIXELS) -> MediaInfo:
    """Probe a file of ``kind`` "video" or "image"."""
    if kind == "video":
        return probe_video(path, max_pixels=max_pixels)
    if kind == "image":
        return probe_image(path, max_pixels=max_pixels)
    raise ValueError(f"unknown media kind {kind!r}: expected 'video' or 'image'")


# ----------------------------------------------------------------------------------------------
# decoding


def _check_geometry(resize_hw: tuple[int, int], crop_box: tuple[int, int, int, int]) -> None:
    rh, rw = resize_hw
    top, left, ch, cw = crop_box
    if rh <= 0 or rw <= 0:
        raise ValueError(f"resize_hw must be positive, got {resize_hw}")
    if ch <= 0 or cw <= 0 or top < 0 or left < 0 or top + ch > rh or left + cw > rw:
        raise ValueError(
            f"crop_box (top, left, height, width)={crop_box} does not fit in the resized frame {resize_hw}"
        )


def _resize_crop(
    frame: np.ndarray | Image.Image, resize_hw: tuple[int, int], crop_box: tuple[int, int, int, int],
    orientation: int = 1,
) -> np.ndarray:
    rh, rw = resize_hw
    top, left, ch, cw = crop_box
    img = _upright(frame if isinstance(frame, Image.Image) else Image.fromarray(frame), orientation)
    if img.size != (rw, rh):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    return np.asarray(img)[top : top + ch, left : left + cw]


def _as_numpy(arr: object) -> np.ndarray:
    """decord returns its own NDArray, or a torch tensor if someone set decord's torch bridge."""
    asnumpy = getattr(arr, "asnumpy", None)
    if asnumpy is not None:
        return asnumpy()
    return np.asarray(arr)


def decode_video(
    path: PathLike,
    indices: Sequence[int],
    resize_hw: tuple[int, int],
    crop_box: tuple[int, int, int, int],
    *,
    media: MediaInfo | None = None,
    num_threads: int = 1,
    max_pixels: int = MAX_IMAGE_PIXELS,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Decode source frames ``indices`` (in that order) upright, resize each to ``resize_hw`` =
    (h, w) and crop ``crop_box`` = (top, left, height, width). Returns uint8 [F, height, width, 3].

    ``media`` is the file's probe (probed here when not given): it names the decoder. When decord
    fails on a file mid-way, PyAV reads it instead and a line saying so is appended to ``notes``.
    ``max_pixels``: the decompression-bomb limit of an animation's frames (Pillow-read files)."""
    _check_geometry(resize_hw, crop_box)
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices is empty")
    p = _check_file(path)
    return _interruptible(lambda: _decode_video(p, idx, resize_hw, crop_box, media, num_threads, max_pixels, notes))


def _decode_video(
    p: Path,
    idx: list[int],
    resize_hw: tuple[int, int],
    crop_box: tuple[int, int, int, int],
    media: MediaInfo | None,
    num_threads: int,
    max_pixels: int,
    notes: list[str] | None,
) -> np.ndarray:
    if media is None:
        media = _probe_video(p, num_threads, max_pixels)
    bad = [i for i in idx if i < 0 or i >= media.frames]
    if bad:
        raise ValueError(f"frame indices {bad[:5]} out of range for {p} ({media.frames} frames)")
    orientation = media.orientation
    if media.decoder == "decord":
        try:
            frames = _decord_frames(p, idx, media, num_threads)
            orientation = 1  # decord shows the frames upright itself
        except MediaError as e:
            if notes is not None:
                notes.append(f"decord failed ({e}); read with pyav")
            frames = _pyav_frames(p, idx, media, num_threads)
    elif media.decoder == "pyav":
        frames = _pyav_frames(p, idx, media, num_threads)
    elif media.decoder == "pillow":
        frames = _pillow_frames(p, idx, max_pixels)
    else:
        raise ValueError(f"unknown video decoder {media.decoder!r}")
    out = np.stack([_resize_crop(f, resize_hw, crop_box, orientation) for f in frames])
    return np.ascontiguousarray(out, dtype=np.uint8)


def _decord_frames(p: Path, idx: list[int], media: MediaInfo, num_threads: int) -> np.ndarray:
    try:
        reader = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=num_threads)
        if len(reader) != media.frames:
            raise MediaError(f"decord sees {len(reader)} frames, the probe {media.frames}", p)
        batch = _as_numpy(reader.get_batch(idx))
    except _DECORD_ERRORS as e:
        raise MediaError(f"cannot decode video: {_short(str(e), p)}", p) from e
    if batch.shape != (len(idx), media.height, media.width, 3):
        raise MediaError(f"decord returned frames of shape {batch.shape[1:]}, the probe "
                         f"{(media.height, media.width, 3)}", p)
    return batch


def _pyav_frames(p: Path, idx: list[int], media: MediaInfo, num_threads: int) -> list[np.ndarray]:
    """Frames ``idx`` (presentation order) of the probed stream. A demux pass (no decoding) gives
    every frame's timestamp; decoding then starts at the last keyframe before the first frame
    wanted, and a frame's index is the rank of its timestamp. Without usable timestamps the
    frames are counted from the start."""
    wanted = sorted(set(idx))
    try:
        with av.open(str(p)) as container:
            packets = [(pk.pts, pk.is_keyframe) for pk in container.demux(container.streams[media.stream]) if pk.size]
        if len(packets) != media.frames:
            raise MediaError(f"cannot decode video: {len(packets)} frames now, {media.frames} when probed", p)
        order = sorted(pts for pts, _ in packets) if all(pts is not None for pts, _ in packets) else []
        if len(set(order)) != len(order) or not order:
            order = []
        got = _pyav_decode(p, media.stream, wanted, order, packets, num_threads)
        if order and len(got) < len(wanted):  # timestamps that did not match the frames: count instead
            got = _pyav_decode(p, media.stream, wanted, [], packets, num_threads)
    except _AV_ERRORS as e:
        raise MediaError(f"cannot decode video: {_av_message(e)}", p) from e
    missing = [i for i in wanted if i not in got]
    if missing:
        raise MediaError(f"cannot decode video: frame {missing[0]} of {media.frames} did not decode", p)
    return [got[i] for i in idx]


def _pyav_decode(p: Path, index: int, wanted: list[int], order: list[int], packets: list[tuple],
                 num_threads: int) -> dict[int, np.ndarray]:
    got: dict[int, np.ndarray] = {}
    targets = set(wanted)
    with av.open(str(p)) as container:
        stream = container.streams[index]
        stream.thread_type = "AUTO" if num_threads != 1 else "SLICE"
        stream.thread_count = num_threads
        if order:
            first = order[wanted[0]]
            start = max((pts for pts, key in packets if key and pts <= first), default=order[0])
            if start > order[0]:
                container.seek(start, stream=stream, backward=True, any_frame=False)
        position = -1
        for frame in container.decode(stream):
            if order:
                if frame.pts is None:
                    return got  # cannot place it: the caller counts from the start instead
                position = bisect_left(order, frame.pts)
                if position == len(order) or order[position] != frame.pts:
                    return got
            else:
                position += 1
            if position in targets and position not in got:
                got[position] = frame.to_ndarray(format="rgb24")
                if len(got) == len(targets):
                    break
            elif position > wanted[-1]:
                break
    return got


def _pillow_frames(p: Path, idx: list[int], max_pixels: int) -> list[Image.Image]:
    got: dict[int, Image.Image] = {}
    with _open_image(p, max_pixels) as img:
        for i in sorted(set(idx)):
            try:
                img.seek(i)
                got[i] = img.convert("RGB")
            except _PIL_ERRORS as e:
                raise MediaError(f"cannot decode video: frame {i} unreadable ({_short(str(e), p)})", p) from e
    return [got[i] for i in idx]


def decode_image(
    path: PathLike, resize_hw: tuple[int, int], crop_box: tuple[int, int, int, int], *,
    max_pixels: int = MAX_IMAGE_PIXELS, notes: list[str] | None = None, media: MediaInfo | None = None,
) -> np.ndarray:
    """Decode an image as RGB (EXIF orientation applied; an animation's first frame), resize to
    ``resize_hw`` and crop ``crop_box``. Returns uint8 [1, height, width, 3]. A damaged file that
    still yields every row loads, with a warning appended to ``notes``. An image Pillow cannot
    identify is read by FFmpeg when it holds one frame (its probe says decoder "pyav")."""
    _check_geometry(resize_hw, crop_box)
    p = _check_file(path)
    return _interruptible(lambda: _decode_image(p, resize_hw, crop_box, max_pixels, notes, media))


def _decode_image(p: Path, resize_hw: tuple[int, int], crop_box: tuple[int, int, int, int], max_pixels: int,
                  notes: list[str] | None, media: MediaInfo | None = None) -> np.ndarray:
    if media is not None and media.decoder == "pyav":
        info, frame = _ffmpeg_still(p, max_pixels, MediaError("cannot read image: no longer one frame FFmpeg "
                                                              "reads", p))
        return _resize_crop(frame, resize_hw, crop_box, info.orientation)[None].copy()
    try:
        rgb, note = _load_rgb(p, max_pixels)
    except MediaError as e:
        if media is not None or not isinstance(e.__cause__, Image.UnidentifiedImageError):
            raise
        info, frame = _ffmpeg_still(p, max_pixels, e)
        return _resize_crop(frame, resize_hw, crop_box, info.orientation)[None].copy()
    if note and notes is not None:
        notes.append(note)
    return _resize_crop(rgb, resize_hw, crop_box)[None].copy()


def decode(path: PathLike, kind: str, indices: Sequence[int], resize_hw: tuple[int, int],
           crop_box: tuple[int, int, int, int], *, media: MediaInfo | None = None,
           max_pixels: int = MAX_IMAGE_PIXELS, notes: list[str] | None = None) -> np.ndarray:
    """Decode a planned sample of ``kind`` "video" (frames ``indices``) or "image"."""
    if kind == "video":
        return decode_video(path, indices, resize_hw, crop_box, media=media, max_pixels=max_pixels, notes=notes)
    if kind == "image":
        return decode_image(path, resize_hw, crop_box, max_pixels=max_pixels, notes=notes, media=media)
    raise ValueError(f"unknown media kind {kind!r}: expected 'video' or 'image'")


def frames_to_tensor(frames_uint8: np.ndarray) -> "torch.Tensor":
    """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in [-1, 1] (the VAE's input range)."""
    import torch  # lazy: keeps `import cogfun.video` cheap

    if frames_uint8.dtype != np.uint8 or frames_uint8.ndim != 4 or frames_uint8.shape[3] != 3:
        raise ValueError(
            f"expected uint8 frames [F, H, W, 3], got {frames_uint8.dtype} {tuple(frames_uint8.shape)}"
        )
    t = torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(3, 0, 1, 2)
    return t.to(torch.float32).div_(127.5).sub_(1.0).contiguous()


# ----------------------------------------------------------------------------------------------
# writing


def _rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> planar yuv420p [H * 3 / 2, W] (BT.601, limited range, 2x2 chroma mean),
    the conversion decoders assume for untagged SD video. Explicit, so the bytes are ours."""
    h, w, _ = frame.shape
    rgb = frame.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    cb = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    cr = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8).ravel() for p in (y, sub(cb), sub(cr))]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def write_video(path: PathLike, frames: np.ndarray, fps: int, *, codec: str = "libx264", fmt: str = "mp4",
                pix_fmt: str = "yuv420p", options: dict[str, str] | None = None, rotation: int | None = None,
                hflip: bool = False, extra_streams: Sequence[np.ndarray] = (), comment: str | None = None) -> Path:
    """Encode RGB uint8 frames [F, H, W, 3] at `fps` with PyAV's FFmpeg (`codec` into container `fmt`).

    The one video writer of cogfun (`write_mp4` is its H.264 preset; the media test files use the
    other codecs). `rotation` (degrees counter-clockwise) and `hflip` write a display matrix, as a
    phone does; `extra_streams`: more video streams (same codec, muxed before the main one: e.g. a
    thumbnail track), each [F, h, w, 3]; `comment` goes into the container's comment tag. yuv420p
    frames are converted by :func:`_rgb_to_yuv420p` (our bytes), others by FFmpeg. Single-threaded
    encoders (x264's threads made its output vary between identical calls). Written as
    `<name>.tmp` and renamed, so a reader never sees half a file; the file gets the user's umask.
    libx265 needs a width of at least 64 (narrower frames corrupt its heap in this build).
    """
    path = Path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with av.open(str(tmp), mode="w", format=fmt) as container:
        if comment is not None:
            container.metadata["comment"] = comment
        streams = []
        for clip in [*extra_streams, frames]:
            n, h, w, _ = clip.shape
            if pix_fmt.startswith("yuv420") and (h % 2 or w % 2):
                raise ValueError(f"{pix_fmt} needs even sizes, got {h}x{w}")
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            stream.time_base = Fraction(1, fps)
            stream.codec_context.thread_type = "NONE"
            stream.codec_context.thread_count = 1
            stream.options = dict(options or {})
            streams.append((stream, clip))
        if rotation is not None or hflip:
            streams[-1][0].set_display_rotation(rotation or 0, hflip=hflip)
        for i in range(len(frames)):
            for stream, clip in streams:
                if pix_fmt == "yuv420p":
                    vf = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(clip[i]), format="yuv420p")
                else:
                    vf = av.VideoFrame.from_ndarray(clip[i], format="rgb24").reformat(format=pix_fmt)
                vf.pts = i
                for packet in stream.encode(vf):
                    container.mux(packet)
        for stream, _ in streams:
            for packet in stream.encode():
                container.mux(packet)
    os.replace(tmp, path)
    return path


# x264 settings of `write_mp4`: near-lossless, and reproducible bytes (its macroblock-tree rate
# control, SIMD reads of uninitialised padding it seems, made the output vary between identical calls).
MP4_OPTIONS = {"crf": "12", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}


def write_mp4(path: PathLike, frames: np.ndarray, fps: int, *, comment: str | None = None) -> Path:
    """uint8 [F, H, W, 3] RGB -> an H.264 / yuv420p mp4 at `fps`, byte-reproducible (synthetic
    test clips, `cogfun sample`, validation videos). See `write_video`. Returns the path."""
    return write_video(path, frames, fps, options=MP4_OPTIONS, comment=comment)
