"""A CogVideoX-Fun dataset: metadata rows -> probed sources -> sample plans (+ skipped, with reasons).

The metadata is a JSON list (or a CSV) of rows with `file_path`, `text` and `type`
("video" / "image"). A malformed metadata file is fatal (MetadataError naming the file and the
row or line); a bad row or a bad clip is skipped with a reason that ends up in the report.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cogfun.buckets import PlanSkip, SamplePlan, Sampling, plan_clip


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
    fps: float = 0.0     # average frame rate, known after probing (0 for images)

    def digest_fields(self) -> tuple:
        """What identifies this input for the precompute fingerprint (the type decides how it is decoded)."""
        return (self.file_path, self.size, self.mtime_ns, self.text, self.kind)


@dataclass(frozen=True)
class Skipped:
    file_path: str
    reason: str

    def to_json(self) -> dict:
        return {"file_path": self.file_path, "reason": self.reason}


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
    """Validate rows and resolve paths (no decoding). Duplicate file_paths keep the first row."""
    rows = read_metadata(meta)
    root = Path(data_dir) if data_dir else Path(meta).parent
    sources: list[Source] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        file_path = row.get("file_path")
        if not file_path or not isinstance(file_path, str):
            skipped.append(Skipped(f"<row {i}>", "row has no file_path"))
            continue
        text = row.get("text")
        if text is None or not isinstance(text, str):
            skipped.append(Skipped(file_path, f"row {i} has no text (caption)"))
            continue
        kind = (row.get("type") or "video")
        if kind not in ("video", "image"):
            skipped.append(Skipped(file_path, f"type must be 'video' or 'image', got {kind!r}"))
            continue
        if file_path in seen:
            skipped.append(Skipped(file_path, f"duplicate row {i} (the first row with this file_path is used)"))
            continue
        seen.add(file_path)
        path = Path(file_path) if os.path.isabs(file_path) else root / file_path
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            size, mtime = -1, -1
        sources.append(Source(file_path=file_path, text=text, kind=kind, path=str(path), size=size, mtime_ns=mtime))
    return sources, skipped


def _probe_one(src: Source):
    from cogfun.video import MediaError, probe

    if src.size < 0:
        return None, "file not found"
    if src.size == 0:
        return None, "empty file (0 bytes)"
    try:
        return probe(src.path, src.kind), None
    except MediaError as exc:
        return None, str(exc)


def probe_and_plan(sources: list[Source], sampling: Sampling, *, workers: int = 8,
                   progress: bool = True) -> tuple[list[SamplePlan], list[Skipped], dict[str, Source]]:
    """Probe every source in parallel and plan its samples.

    Returns (plans sorted by key, skipped sorted by file_path, key -> source with its probed fps).
    """
    from tqdm import tqdm

    sampling.validate()
    plans: list[SamplePlan] = []
    skipped: list[Skipped] = []
    by_key: dict[str, Source] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_probe_one, sources)
        bar = tqdm(results, total=len(sources), desc="probe", unit="clip",
                   disable=not progress or len(sources) < 50, leave=False)
        for src, (info, reason) in zip(sources, bar):
            if info is None:
                skipped.append(Skipped(src.file_path, reason))
                continue
            try:
                clip_plans = plan_clip(sampling, src.file_path, src.kind, frames=info.frames,
                                       height=info.height, width=info.width)
            except PlanSkip as exc:
                skipped.append(Skipped(src.file_path, str(exc)))
                continue
            src = dataclasses.replace(src, fps=info.fps)
            for p in clip_plans:
                plans.append(p)
                by_key[p.key] = src
    plans.sort(key=lambda p: p.key)
    skipped.sort(key=lambda s: s.file_path)
    return plans, skipped, by_key
