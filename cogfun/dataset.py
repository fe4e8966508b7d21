"""A CogVideoX-Fun dataset: metadata rows -> probed sources -> sample plans (+ skipped, with reasons).

The metadata is a JSON list (or a CSV) of rows with `file_path`, `text` and `type`
("video" / "image"). A malformed metadata file is fatal (MetadataError naming the file and the
row or line); a bad row or a bad clip is skipped with a reason (and a category, for the counts)
that ends up in the report.

One sample source per (file_path, text, type), as CogVideoX-Fun trains every row: a file listed
with two captions gives two sources. Their identities are positional: `file_path` for the first and
`file_path#k` for the k-th distinct (text, type) of that file in metadata order. So a dataset
without caption variants keeps the identities (and sample keys) it always had, appending a variant
after a file's others is an added source, changing one is a changed source, and reordering a file's
variants or removing (or inserting) one before others renumbers the later ones: changed and removed
sources. A row repeating an earlier one exactly is reported as a duplicate and gives no second sample.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cogfun.buckets import PlanSkip, SamplePlan, Sampling, plan_clip

if TYPE_CHECKING:
    from cogfun.probes import ProbeCache
    from cogfun.video import MediaInfo


class MetadataError(ValueError):
    """The metadata file itself cannot be read; the message names the file and line/row."""


@dataclass(frozen=True)
class Source:
    file_path: str       # as written in the metadata (relative to train_data_dir, or absolute)
    text: str
    kind: str            # "video" | "image"
    path: str            # resolved path on disk
    size: int = -1       # bytes on disk (-1: missing)
    mtime_ns: int = -1
    variant: int = 1     # k-th distinct (text, type) listed for this file_path
    media: "MediaInfo | None" = None  # the probe's result (frames, fps, size, decoder), once probed

    @property
    def identity(self) -> str:
        """The sample source's name: file_path, or file_path#k for caption variant k >= 2."""
        return self.file_path if self.variant == 1 else f"{self.file_path}#{self.variant}"

    @property
    def fps(self) -> float:
        """Average frame rate, known after probing (0 for images)."""
        return self.media.fps if self.media is not None else 0.0

    def digest_fields(self) -> tuple:
        """What identifies this input for the precompute fingerprint (the type decides how it is decoded)."""
        return (self.file_path, self.size, self.mtime_ns, self.text, self.kind)


@dataclass(frozen=True)
class Skipped:
    file_path: str
    reason: str
    category: str = "bad row"   # groups reasons for the counts in reports

    def to_json(self) -> dict:
        return {"file_path": self.file_path, "reason": self.reason, "category": self.category}


# skip categories a better decoder cannot change
_ROW_CATEGORIES = {"bad row", "duplicate row", "not found", "empty file", "unreadable"}


def retry_skipped(manifest: dict, max_image_pixels: int) -> bool:
    """Whether a finished shard dir skipped sources that may become samples now: it was made with a
    lower --max_image_pixels and skipped an image as too large, or its manifest records fewer
    `media_readers` than this cogfun's (a cogfun reading fewer formats). Its fingerprint still
    matches (the inputs and settings that make a sample's bytes are the same): the run is then
    incremental. Dirs older than shard format 2 fail the fingerprint (format version); from
    MEDIA_READERS 3 on (stills only FFmpeg reads) dirs that recorded 2 retry their skips."""
    from cogfun.video import MAX_IMAGE_PIXELS, MEDIA_READERS

    skipped = manifest.get("skipped", [])
    if manifest.get("media_readers", 1) < MEDIA_READERS and any(
            s.get("category") not in _ROW_CATEGORIES for s in skipped):
        return True
    limit = manifest.get("config", {}).get("max_image_pixels", MAX_IMAGE_PIXELS)
    return limit < max_image_pixels and any(s.get("category") == "too large" for s in skipped)


def count_by_category(skipped: list[dict]) -> dict[str, int]:
    """{category: how many} of skipped entries (as in a manifest or report), most frequent first."""
    from collections import Counter

    counts = Counter(s.get("category", "other") for s in skipped)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def read_metadata(meta: str | Path) -> list[dict]:
    """Rows of a metadata.json / .csv. Raises MetadataError when the file is unusable."""
    path = Path(meta)
    if not path.is_file():
        raise MetadataError(f"{path}: metadata file not found")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, strict=True)
            if not reader.fieldnames or "file_path" not in reader.fieldnames:
                raise MetadataError(f"{path}: line 1: CSV header must name the columns file_path, text, type "
                                    f"(got {reader.fieldnames})")
            rows = []
            try:
                for row in reader:
                    if None in row:
                        raise MetadataError(f"{path}: line {reader.line_num}: more fields than the header has")
                    rows.append(row)
            except csv.Error as exc:
                raise MetadataError(f"{path}: line {reader.line_num}: {exc}") from exc
            return rows
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not UTF-8 text ({exc})") from exc
    if not isinstance(data, list):
        raise MetadataError(f"{path}: must hold a JSON list of {{file_path, text, type}} objects, "
                            f"got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise MetadataError(f"{path}: row {i}: must be an object, got {type(row).__name__}")
    return data


def load_sources(meta: str | Path, data_dir: str | Path | None) -> tuple[list[Source], list[Skipped]]:
    """Validate rows and resolve paths (no decoding): one source per distinct (file_path, text,
    type); an exact repeat of a row is skipped as a duplicate."""
    rows = read_metadata(meta)
    root = Path(data_dir) if data_dir else Path(meta).parent
    sources: list[Source] = []
    skipped: list[Skipped] = []
    seen: dict[tuple[str, str, str], int] = {}      # (file_path, text, type) -> first row
    variants: dict[str, int] = {}                    # file_path -> variants so far
    file_paths = {row["file_path"] for row in rows if isinstance(row.get("file_path"), str)}
    for i, row in enumerate(rows):
        file_path = row.get("file_path")
        if not file_path:
            skipped.append(Skipped(f"<row {i}>", "row has no file_path"))
            continue
        if not isinstance(file_path, str):
            skipped.append(Skipped(f"<row {i}>", f"file_path must be one path (a string), got "
                                                 f"{type(file_path).__name__} {file_path!r:.80}"))
            continue
        text = row.get("text")
        if text is None or not isinstance(text, str):
            skipped.append(Skipped(file_path, f"row {i} has no text (caption)"))
            continue
        kind = (row.get("type") or "video")
        if kind not in ("video", "image"):
            skipped.append(Skipped(file_path, f"type must be 'video' or 'image', got {kind!r}"))
            continue
        first = seen.setdefault((file_path, text, kind), i)
        if first != i:
            skipped.append(Skipped(file_path, f"row {i} repeats row {first} (same file_path, text and type): "
                                              f"one sample", "duplicate row"))
            continue
        variant = variants[file_path] = variants.get(file_path, 0) + 1
        if variant > 1 and f"{file_path}#{variant}" in file_paths:
            skipped.append(Skipped(file_path, f"row {i}: caption variant {variant} of this file would be named "
                                              f"like the file {file_path}#{variant}; rename one of them"))
            continue
        path = Path(file_path) if os.path.isabs(file_path) else root / file_path
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            size, mtime = -1, -1
        sources.append(Source(file_path=file_path, text=text, kind=kind, path=str(path), size=size, mtime_ns=mtime,
                              variant=variant))
    return sources, skipped


def _probe_one(path_kind: tuple, max_pixels: int):
    from cogfun.video import MediaError, probe

    try:
        return probe(path_kind[0], path_kind[-1], max_pixels=max_pixels), None
    except MediaError as exc:
        return None, exc


def probe_and_plan(sources: list[Source], sampling: Sampling, *, workers: int = 8, progress: bool = True,
                   max_pixels: int | None = None, cache: "ProbeCache | None" = None,
                   ) -> tuple[list[SamplePlan], list[Skipped], dict[str, Source]]:
    """Probe every file in parallel (once per file and type, whatever its captions) and plan the
    samples of every source.

    `cache` (cogfun.probes): files found there (same path, size, mtime and type) are not probed;
    what is probed is added to it (`cache.new`, for the caller to save).
    Returns (plans sorted by key, skipped sorted by file_path, key -> source with its probe).
    A file that cannot be used is skipped once, with the reason and its category.
    """
    from functools import partial

    from tqdm import tqdm

    from cogfun.video import MAX_IMAGE_PIXELS

    sampling.validate()
    plans: list[SamplePlan] = []
    skipped: dict[tuple[str, str], Skipped] = {}
    by_key: dict[str, Source] = {}
    files = sorted({(src.path, src.size, src.mtime_ns, src.kind) for src in sources})
    probed = {}
    if cache is not None:
        probed = {f: found for f in files if (found := cache.get(f)) is not None}
        files = [f for f in files if f not in probed]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(partial(_probe_one, max_pixels=max_pixels or MAX_IMAGE_PIXELS), files)
        bar = tqdm(results, total=len(files), desc="probe", unit="clip",
                   disable=not progress or len(files) < 50, leave=False)
        for f, result in zip(files, bar):
            probed[f] = result
            if cache is not None:
                cache.put(f, *result)
    for src in sources:
        info, error = probed[(src.path, src.size, src.mtime_ns, src.kind)]
        if info is None:
            skipped.setdefault((src.file_path, src.kind), Skipped(src.file_path, str(error), error.category))
            continue
        try:
            clip_plans = plan_clip(sampling, src.file_path, src.kind, frames=info.frames,
                                   height=info.height, width=info.width, identity=src.identity)
        except PlanSkip as exc:
            skipped.setdefault((src.file_path, src.kind), Skipped(src.file_path, str(exc), exc.category))
            continue
        src = dataclasses.replace(src, media=info)
        for p in clip_plans:
            plans.append(p)
            by_key[p.key] = src
    plans.sort(key=lambda p: p.key)
    return plans, sorted(skipped.values(), key=lambda s: s.file_path), by_key


def media_report(sources, notes=()) -> dict:
    """{"decoders": {decoder: [file_path, ...]} for sources not read by their kind's default
    decoder (decord for videos, Pillow for images), "warnings": [{file_path, warning}] for damaged
    files that still loaded}, from probed sources and the decode's (file_path, warning) `notes`."""
    from cogfun.video import DEFAULT_DECODER

    decoders: dict[str, set[str]] = {}
    warnings = set(notes)
    for src in sources:
        media = src.media
        if media is None:
            continue
        if media.decoder != DEFAULT_DECODER[src.kind]:
            decoders.setdefault(media.decoder, set()).add(src.file_path)
        if media.note:
            warnings.add((src.file_path, media.note))
    return {"decoders": {k: sorted(v) for k, v in sorted(decoders.items())},
            "warnings": [{"file_path": f, "warning": w} for f, w in sorted(warnings)]}
