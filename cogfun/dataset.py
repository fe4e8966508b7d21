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
import tarfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cogfun.buckets import PlanSkip, SamplePlan, Sampling, plan_clip

if TYPE_CHECKING:
    from cogfun.probes import ProbeCache
    from cogfun.storage import MediaFetcher
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
    member_offset: int = -1  # a WebDataset tar's member (path `<tar>#<member>`): its data's offset in the tar

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
_ROW_CATEGORIES = {"bad row", "duplicate row", "not found", "empty file", "unreadable", "fetch failed"}


def retry_skipped(manifest: dict, max_image_pixels: int) -> bool:
    """Whether a finished shard dir skipped sources that may become samples now: it was made with a
    lower --max_image_pixels and skipped an image as too large, it could not fetch a file (a URL or
    tar unreachable after the retries: fetched again), or its manifest records fewer
    `media_readers` than this cogfun's (a cogfun reading fewer formats). Its fingerprint still
    matches (the inputs and settings that make a sample's bytes are the same): the run is then
    incremental. Dirs older than shard format 2 fail the fingerprint (format version); from
    MEDIA_READERS 3 on (stills only FFmpeg reads) dirs that recorded 2 retry their skips."""
    from cogfun.video import MAX_IMAGE_PIXELS, MEDIA_READERS

    skipped = manifest.get("skipped", [])
    if any(s.get("category") == "fetch failed" for s in skipped):   # the network may be back
        return True
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


def read_metadata(meta: str | Path, fetch: "MediaFetcher | None" = None) -> list[dict]:
    """Rows of a metadata.json / .csv (a path or a URL). Raises MetadataError when the file is unusable."""
    import io

    from cogfun.shards import ShardError
    from cogfun.storage import MediaFetcher, is_url

    path = Path(meta)
    if is_url(meta):
        try:
            text = (fetch or MediaFetcher()).read_bytes(str(meta)).decode("utf-8")
        except FileNotFoundError:
            raise MetadataError(f"{meta}: metadata file not found") from None
        except (ShardError, UnicodeDecodeError) as exc:
            raise MetadataError(f"{meta}: cannot read it: {exc}") from None
        path = meta
        opener = lambda: io.StringIO(text, newline="")  # noqa: E731
    elif not path.is_file():
        raise MetadataError(f"{path}: metadata file not found")
    else:
        opener = lambda: open(path, newline="", encoding="utf-8")  # noqa: E731
    if Path(str(meta)).suffix.lower() == ".csv":
        with opener() as fh:
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
        with opener() as fh:
            data = json.loads(fh.read())
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


def load_sources(meta: str | Path, data_dir: str | Path | None, fetch: "MediaFetcher | None" = None, *,
                 stat: bool = True) -> tuple[list[Source], list[Skipped]]:
    """Validate rows and resolve paths (no decoding): one source per distinct (file_path, text,
    type); an exact repeat of a row is skipped as a duplicate. The metadata, the data dir and a
    row's file_path may be URLs: such files are listed by their size and version (HEAD / stat
    requests, in parallel), not fetched. `stat=False`: sizes and versions left for `stat_paths`
    (precompute shares that work out over its ranks)."""
    from cogfun.storage import is_url

    rows = read_metadata(meta, fetch)
    if data_dir:
        root = str(data_dir)
    else:
        root = str(meta).rsplit("/", 1)[0] if is_url(meta) else str(Path(meta).parent)
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
        if is_url(file_path) or os.path.isabs(file_path):
            path = file_path
        elif is_url(root):
            path = f"{root.rstrip('/')}/{file_path}"
        else:
            path = str(Path(root) / file_path)
        sources.append(Source(file_path=file_path, text=text, kind=kind, path=path, variant=variant))
    if stat:
        sources = with_stats(sources, stat_paths(sorted({s.path for s in sources}), fetch))
    return sources, skipped


def with_stats(sources: list[Source], stats: dict[str, tuple[int, int]]) -> list[Source]:
    return [dataclasses.replace(s, size=stats[s.path][0], mtime_ns=stats[s.path][1]) for s in sources]


def stat_paths(paths: list[str], fetch: "MediaFetcher | None") -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns or a remote object's version)}; (-1, -1) for a missing file. A URL
    that cannot be reached (after the fetcher's retries) is (-1, -1) too: its probe then says why."""
    from cogfun.shards import ShardError
    from cogfun.storage import MediaFetcher, is_url

    def one(path: str) -> tuple[int, int]:
        if is_url(path):
            try:
                return fetcher.stat(path)
            except (FileNotFoundError, ShardError):
                return -1, -1
        try:
            st = os.stat(path)
            return st.st_size, st.st_mtime_ns
        except FileNotFoundError:
            return -1, -1

    remote = [p for p in paths if is_url(p)]
    fetcher = fetch or MediaFetcher()
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = dict(zip(remote, pool.map(one, remote)))
    got.update((p, one(p)) for p in paths if not is_url(p))
    return got


#: media member extensions of a WebDataset sample (video2dataset / img2dataset layout) -> kind
TAR_MEDIA = {**{e: "video" for e in ("mp4", "m4v", "mov", "avi", "mkv", "webm", "flv", "mpg", "mpeg", "ts",
                                      "wmv", "3gp", "ogv")},
             **{e: "image" for e in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "avif", "heic", "heif",
                                     "gif")}}


def media_tars(pattern: str) -> list[str]:
    """The tars of a --train_data_shards brace pattern (local paths or URLs), in pattern order."""
    from braceexpand import braceexpand

    from cogfun.storage import plain_path

    tars = [plain_path(t) for part in pattern.split() for t in braceexpand(part)]
    if not tars:
        raise MetadataError(f"--train_data_shards {pattern!r}: names no tar")
    return tars


def load_tar_sources(tars: list[str], caption_key: str = "caption", fetch: "MediaFetcher | None" = None,
                     listings=None) -> tuple[list[Source], list[Skipped]]:
    """One source per sample of WebDataset tars of media: the sample's media member (the first of
    TAR_MEDIA's extensions it has; its kind from the extension) with the caption of its `.txt`, else
    the `caption_key` of its `.json`. The sample key (webdataset's: the member name up to the first
    dot of its base name) is the source's identity. A remote tar is fetched once per node into the
    media cache. A tar that cannot be fetched or read, and a sample without media or caption, is
    skipped with the reason; a key seen before is skipped as a duplicate.

    `listings`: a shard dir (path, URL or ShardStore) whose tar listings (cogfun.probes) are used
    for tars of the same size and version instead of reading them; a local one also receives the
    listings made now."""
    from cogfun import probes
    from cogfun.shards import ShardError
    from cogfun.storage import CacheTooSmall, MediaFetcher, is_url

    fetch = fetch or MediaFetcher()
    sources: list[Source] = []
    skipped: list[Skipped] = []
    for tar in tars:
        try:
            if is_url(tar):
                size, version = fetch.stat(tar)
            else:
                st = os.stat(tar)
                size, version = st.st_size, st.st_mtime_ns
            name = probes.listing_name(tar, size, version, caption_key)
            listing = probes.read_listing(listings, name) if listings is not None else None
            if listing is None:
                if is_url(tar):
                    fetch.check_fits({tar: size})
                listing = _list_tar(tar, fetch.local(tar, size), version, caption_key)
                if listings is not None and not is_url(str(listings)):
                    probes.write_listing(listings, name, listing)
        except FileNotFoundError:
            skipped.append(Skipped(tar, "tar not found", "not found"))
            continue
        except CacheTooSmall:
            raise
        except ShardError as exc:
            skipped.append(Skipped(tar, f"cannot fetch the tar: {exc}", "fetch failed"))
            continue
        except (tarfile.TarError, OSError) as exc:
            skipped.append(Skipped(tar, f"cannot read the tar: {exc}", "corrupt"))
            continue
        sources += [Source(**row) for row in listing["sources"]]
        skipped += [Skipped(**row) for row in listing["skipped"]]
    sources, duplicates = unique_keys(sources)
    return sources, skipped + duplicates


def _list_tar(tar: str, local: Path, version: int, caption_key: str) -> dict:
    """{"sources": [Source fields], "skipped": [Skipped fields]} of one local tar (headers and
    the small .txt / .json members read; media members skipped over)."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    texts: dict[tuple[str, str], bytes] = {}
    with tarfile.open(local, mode="r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            samples.setdefault(key, {})[ext.lower()] = member
            if ext.lower() in ("txt", "json"):
                texts[(key, ext.lower())] = tf.extractfile(member).read()
    sources, skipped = [], []
    for key, members in samples.items():
        media = next((ext for ext in members if ext in TAR_MEDIA), None)
        if media is None:
            skipped.append(Skipped(key, f"sample of {tar} has no media member (got .{', .'.join(sorted(members))})",
                                   "bad row").to_json())
            continue
        text, error = _tar_caption(texts, key, caption_key)
        if text is None:
            skipped.append(Skipped(key, f"sample of {tar}: {error}", "bad row").to_json())
            continue
        m = members[media]
        sources.append({"file_path": key, "text": text, "kind": TAR_MEDIA[media], "path": f"{tar}#{m.name}",
                        "size": m.size, "mtime_ns": version, "member_offset": m.offset_data})
    return {"sources": sources, "skipped": skipped}


def unique_keys(sources: list[Source]) -> tuple[list[Source], list[Skipped]]:
    """Tar sources (in tar order) without a sample key seen before: each later one is skipped."""
    seen: dict[str, str] = {}
    kept, skipped = [], []
    for src in sources:
        tar = src.path.partition("#")[0]
        if src.identity in seen:
            skipped.append(Skipped(src.identity, f"sample key of {tar} already seen in {seen[src.identity]}: one "
                                                 f"sample", "duplicate row"))
        else:
            seen[src.identity] = tar
            kept.append(src)
    return kept, skipped


def _tar_caption(texts: dict, key: str, caption_key: str) -> tuple[str | None, str]:
    if (key, "txt") in texts:
        try:
            return texts[(key, "txt")].decode("utf-8").strip(), ""
        except UnicodeDecodeError:
            return None, "its .txt caption is not UTF-8"
    if (key, "json") in texts:
        try:
            value = json.loads(texts[(key, "json")]).get(caption_key)
        except (ValueError, AttributeError):
            return None, "its .json is not a JSON object"
        if isinstance(value, str):
            return value, ""
        return None, f"its .json has no string {caption_key!r} (--train_data_caption_key)"
    return None, "no caption: neither a .txt nor a .json member"


@contextmanager
def local_media(src: Source, fetch: "MediaFetcher | None"):
    """`with local_media(src, fetch) as path:` a local path holding the source's file while the
    block runs: the file itself, or the node cache's copy of a URL or tar member, held open (the
    path is /proc/self/fd/N) so that another rank's fill evicting it cannot take it away mid-read.
    Raises MediaError (category "not found" or "fetch failed") when it cannot be had."""
    from cogfun.shards import ShardError
    from cogfun.storage import MediaFetcher, is_url
    from cogfun.video import MediaError

    if src.member_offset < 0 and not is_url(src.path):
        yield src.path
        return
    fetch = fetch or MediaFetcher()
    fd = None
    try:
        for _ in range(3):   # a copy evicted by another fill before it was opened is fetched again
            if src.member_offset >= 0:
                tar, _, member = src.path.partition("#")
                path = fetch.local_member(tar, member, src.member_offset, src.size)
            else:
                path = fetch.local(src.path, src.size)
            try:
                fd = os.open(path, os.O_RDONLY)
                break
            except FileNotFoundError:
                continue
    except FileNotFoundError:
        raise MediaError("file not found", src.path, category="not found") from None
    except (ShardError, OSError) as exc:
        raise MediaError(f"cannot fetch: {exc}", src.path, category="fetch failed") from None
    if fd is None:
        raise MediaError("the media cache evicted it as soon as it was fetched: raise --media_cache_size_gb",
                         src.path, category="fetch failed")
    try:
        yield f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path)
    finally:
        os.close(fd)


def _probe_one(src: Source, max_pixels: int, fetch: "MediaFetcher | None" = None):
    from cogfun.video import MediaError, probe

    try:
        with local_media(src, fetch) as path:
            return probe(path, src.kind, max_pixels=max_pixels), None
    except MediaError as exc:
        return None, exc


def probe_and_plan(sources: list[Source], sampling: Sampling, *, workers: int = 8, progress: bool = True,
                   max_pixels: int | None = None, cache: "ProbeCache | None" = None,
                   fetch: "MediaFetcher | None" = None) -> tuple[list[SamplePlan], list[Skipped], dict[str, Source]]:
    """Probe every file in parallel (once per file and type, whatever its captions) and plan the
    samples of every source.

    `cache` (cogfun.probes): files found there (same path, size, mtime and type) are not probed;
    what is probed is added to it (`cache.new`, for the caller to save). `fetch`: how URLs and tar
    members are fetched (cogfun.storage.MediaFetcher; default settings when not given).
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
    one_source = {(src.path, src.size, src.mtime_ns, src.kind): src for src in sources}
    probed = {}
    if cache is not None:
        probed = {f: found for f in files if (found := cache.get(f)) is not None}
        files = [f for f in files if f not in probed]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(partial(_probe_one, max_pixels=max_pixels or MAX_IMAGE_PIXELS, fetch=fetch),
                           [one_source[f] for f in files])
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
