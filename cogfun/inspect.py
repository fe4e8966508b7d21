"""`cogfun inspect-buckets`: what a dataset becomes, before any GPU time is spent.

From a dataset (probe only: no decoding beyond one frame per clip, no model) or from a finished
shard dir (its manifest): the buckets (H x W x F), samples, tokens per sample, bytes, share, the
sources read by a decoder other than the default (decord for videos, Pillow for images) and the
warnings about damaged files that still loaded, and the skipped sources with their reasons and how
many each reason skipped. `--json` prints one object; `--plot` draws a PNG.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import fields

from cogfun.buckets import Sampling, one_frame_videos, parse_bucket, sample_bytes, tokens_per_sample
from cogfun.config import InspectConfig, ConfigError, mask_policy_list
from cogfun.dataset import count_by_category
from cogfun.lowmem import OPTION_NAMES
from cogfun.masks import draw_weights
from cogfun.models import TEXT_LEN
from cogfun.storage import is_url, plain_path

# tar headers (2 members + padding) + json member + safetensors header, per sample (measured ~2-3 KB)
SAMPLE_OVERHEAD = 3072


def report_from_dataset(cfg: InspectConfig) -> dict:
    from cogfun.dataset import load_sources, load_tar_sources, media_report, media_tars, probe_and_plan
    from cogfun.storage import MediaFetcher

    if not cfg.train_data_meta and not cfg.train_data_shards:
        raise ConfigError("give --train_data_meta or --train_data_shards (a dataset to probe) or --shard_dir "
                          "(a finished precompute)")
    text_dim = cfg.text_dim
    policies = mask_policy_list(cfg)
    try:  # what precompute and train would refuse
        draw_weights(policies, cfg.mask_policy_weights, frame_crop=cfg.random_frame_crop,
                     cached_by="these --mask_policies")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    multiple, noise = 1, False
    if cfg.pretrained_model_name_or_path:  # the model's frame rule and reference noise (config reads only)
        from cogfun.models import check_model_fits, read_component_config

        text_dim = read_component_config(cfg.pretrained_model_name_or_path, "text_encoder")["d_model"]
        family = check_model_fits(cfg.pretrained_model_name_or_path, cfg.train_mode)  # as precompute refuses
        multiple, noise = family.latent_multiple, family.reference_noise and bool(policies)
    fetch = MediaFetcher.from_config(cfg)
    if cfg.train_data_shards:
        listings = (cfg.shard_dir if is_url(cfg.shard_dir) else plain_path(cfg.shard_dir)) if cfg.shard_dir else None
        sources, row_skips = load_tar_sources(media_tars(cfg.train_data_shards), cfg.train_data_caption_key, fetch,
                                              listings=listings)
    else:
        sources, row_skips = load_sources(cfg.train_data_meta, cfg.train_data_dir, fetch)
    cache = None
    if cfg.shard_dir:   # its probe cache: files probed before are not probed again
        from cogfun import probes

        cache = probes.load(cfg.shard_dir, paths={s.path for s in sources})
    plans, skips, by_key = probe_and_plan(sources, Sampling.from_config(cfg, latent_multiple=multiple),
                                          workers=cfg.probe_workers, max_pixels=cfg.max_image_pixels, cache=cache,
                                          fetch=fetch)
    if cache is not None and not is_url(cfg.shard_dir):   # what it probed now, for the precompute that follows
        probes.save(plain_path(cfg.shard_dir), cache)
    # caption tables (shard format 2): one T5 embedding per distinct caption, shared out by sample count
    prompts = len({by_key[p.key].text for p in plans}) * TEXT_LEN * text_dim * 2   # bf16
    variants = cfg.masks_per_policy if policies else 1
    counts = Counter(p.bucket for p in plans)
    kinds: dict[str, Counter] = {}
    for p in plans:
        kinds.setdefault(p.bucket, Counter())[p.kind] += 1
    buckets = []
    for name, count in counts.items():
        h, w, f = parse_bucket(name)
        cached = conditioning_latents(policies, f, noise) * variants
        per = sample_bytes(f, h, w, text_dim=0, n_mask_policies=cached) + SAMPLE_OVERHEAD
        prompt_per_sample = prompts / len(plans)  # caption tables: each distinct caption once, shared out
        buckets.append({"name": name, "height": h, "width": w, "frames": f, "count": count,
                        "videos": kinds[name]["video"], "images": kinds[name]["image"],
                        "tokens": tokens_per_sample(f, h, w, multiple),
                        "bytes": per * count + round(prompt_per_sample * count),
                        "bytes_per_sample": per + round(prompt_per_sample), "encodes_per_sample": 1 + cached})
    skipped = [s.to_json() for s in sorted(row_skips + skips, key=lambda s: s.file_path)]
    notes = model_notes(multiple, noise, trimmed=sum(1 for p in plans if p.frames_dropped))
    masks = mask_report(policies, variants, [(p.identity, p.frames) for p in plans])
    return _finish(buckets, skipped, sources=len(sources) + len(row_skips), estimated=True, masks=masks,
                   video_repeat=cfg.video_repeat, notes=notes, one_frame=one_frame_videos(plans),
                   **media_report(by_key.values()))


def model_notes(multiple: int, noise: bool, trimmed: int | None = None) -> list[str]:
    """What the model's config changes in the data: the patch_size_t frame rule, reference noise."""
    notes = []
    if multiple > 1:
        notes.append(f"frame rule (patch_size_t {multiple}, CogVideoX 1.5): a video whose latent frame count is "
                     f"not a multiple of {multiple} keeps 4 frames fewer per extra latent frame (49 -> 45, "
                     f"85 stays); images are padded in the transformer"
                     + (f"; {trimmed} video sample(s) shortened" if trimmed is not None else ""))
    if noise:
        notes.append("reference noise (add_noise_in_inpaint_model): each mask policy also caches the latent "
                     "response to seeded reference noise (2 latents per policy)")
    return notes


def conditioning_latents(policies: list[str], frames: int, noise: bool) -> int:
    """Cached conditioning latents (= extra VAE encodes) of one sample: one per policy it caches (an
    image caches only the spatial ones), two with reference noise."""
    from cogfun.masks import sample_policies

    return len(sample_policies(policies, frames)) * (2 if noise else 1)


def mask_report(policies: list[str], variants: int = 1, samples: list[tuple[str, int]] | None = None) -> dict:
    """The cached mask policies and how much of CogVideoX-Fun's mask distribution they reproduce
    (videos at 49 frames, images); {} without inpaint. `variants`: --masks_per_policy K; `samples`:
    (clip identity, frames) per sample, for the distinct conditionings cached per clip (views x K x
    the policies each caches; + t2v) and the epochs a clip takes to show each view with each mask set
    (views x K)."""
    if not policies:
        return {}
    from cogfun.masks import coverage, sample_policies

    out = {"policies": policies, "image_policies": sample_policies(policies, 1),
           "video_coverage": round(coverage(policies, 49), 4), "image_coverage": round(coverage(policies, 1), 4),
           "masks_per_policy": variants}
    if samples:
        per_clip: dict[str, list[int]] = {}
        for identity, frames in samples:
            per_clip.setdefault(identity, []).append(len(sample_policies(policies, frames)) * variants)
        conds = [sum(v) for v in per_clip.values()]
        out.update(conditionings_per_clip_mean=round(sum(conds) / len(conds), 2), conditionings_per_clip_max=max(conds),
                   cycle_epochs_max=max(len(v) for v in per_clip.values()) * variants)
    return out


def report_from_shards(cfg: InspectConfig) -> dict:
    """From a finished shard dir (local path or URL): manifest + index only, no tar is read."""
    from cogfun.shards import read_index, require_manifest
    from cogfun.storage import ShardStore

    store = ShardStore(cfg.shard_dir)
    manifest = require_manifest(store)
    kinds = Counter()
    table = read_index(store, columns=["bucket", "kind"])
    for b, k in zip(table["bucket"], table["kind"]):
        kinds[(b, k)] += 1
    prompts = sum(manifest["prompt_tables"].values())   # caption tables, shared by the buckets by sample count
    samples = manifest["num_samples"] or 1
    buckets = []
    noise = bool(manifest.get("reference_noise"))
    variants = manifest["config"].get("masks_per_policy", 1) if manifest["mask_policies"] else 1
    for name, b in manifest["buckets"].items():
        size = sum(manifest["shard_bytes"][s] for s in b["shards"]) + round(prompts * b["count"] / samples)
        buckets.append({"name": name, "height": b["height"], "width": b["width"], "frames": b["frames"],
                        "count": b["count"], "videos": kinds[(name, "video")], "images": kinds[(name, "image")],
                        "tokens": b["tokens"], "bytes": size, "bytes_per_sample": size // max(1, b["count"]),
                        "encodes_per_sample": 1 + conditioning_latents(manifest["mask_policies"], b["frames"], noise)
                        * variants})
    notes = model_notes(manifest.get("latent_frame_multiple", 1), noise)
    return _finish(buckets, manifest["skipped"], sources=manifest["num_sources"], estimated=False,
                   video_repeat=manifest["config"].get("video_repeat", 1), fingerprint=manifest["fingerprint"],
                   decoders=manifest.get("decoders", {}), warnings=manifest.get("warnings", []), notes=notes,
                   masks=mask_report(manifest["mask_policies"], variants), one_frame=manifest.get("one_frame_videos", []))


def _finish(buckets: list[dict], skipped: list[dict], *, sources: int, estimated: bool, video_repeat: int,
            fingerprint: str | None = None, decoders: dict | None = None, warnings: list | None = None,
            notes: list[str] = (), masks: dict | None = None, one_frame: list[str] = ()) -> dict:
    buckets.sort(key=lambda b: (b["frames"], b["height"] * b["width"], b["height"]))
    samples = sum(b["count"] for b in buckets)
    weight = sum(b["videos"] * video_repeat + b["images"] for b in buckets) or 1
    for b in buckets:
        b["share"] = round((b["videos"] * video_repeat + b["images"]) / weight, 4)
    total = {"samples": samples, "sources": sources, "skipped": len(skipped), "buckets": len(buckets),
             "bytes": sum(b["bytes"] for b in buckets), "tokens": sum(b["tokens"] * b["count"] for b in buckets),
             "bytes_estimated": estimated, "one_frame_videos": len(one_frame),
             # precompute time follows the VAE work: encodes, and their pixel volume (frames x H x W)
             "vae_encodes": sum(b["encodes_per_sample"] * b["count"] for b in buckets),
             "vae_megapixel_frames": round(sum(b["encodes_per_sample"] * b["count"] * b["frames"] * b["height"]
                                               * b["width"] for b in buckets) / 1e6, 3)}
    if fingerprint:
        total["fingerprint"] = fingerprint
    return {"buckets": buckets, "skipped": skipped, "skipped_by_reason": count_by_category(skipped),
            "decoders": decoders or {}, "warnings": warnings or [], "total": total, "model_notes": list(notes),
            "masks": masks or {}, "one_frame_videos": list(one_frame)}


def format_table(report: dict) -> str:
    lines = [f"{'bucket (HxWxF)':>16} {'samples':>8} {'videos':>7} {'images':>7} {'tokens/sample':>14} "
             f"{'bytes/sample':>12} {'encodes':>7} {'bytes':>11} {'share':>7}"]
    for b in report["buckets"]:
        lines.append(f"{b['name']:>16} {b['count']:>8} {b['videos']:>7} {b['images']:>7} {b['tokens']:>14,} "
                     f"{_human(b['bytes_per_sample']):>12} {b['encodes_per_sample']:>7} {_human(b['bytes']):>11} "
                     f"{b['share']:>7.1%}")
    t = report["total"]
    est = " (estimated)" if t["bytes_estimated"] else " (on disk)"
    lines.append(f"{'total':>16} {t['samples']:>8} {'':>7} {'':>7} {t['tokens']:>14,} {'':>12} {t['vae_encodes']:>7} "
                 f"{_human(t['bytes']):>11}{est}")
    lines.append(f"{t['sources']} sources -> {t['samples']} samples in {t['buckets']} buckets; {t['skipped']} skipped; "
                 f"precompute: {t['vae_encodes']} VAE encodes of {t['vae_megapixel_frames']:,} megapixel-frames "
                 f"(its time scales with these)")
    lines.extend(report.get("model_notes", []))
    m = report.get("masks")
    if m:
        lines.append(f"mask policies {', '.join(m['policies'])} (+ t2v): {m['video_coverage']:.0%} of CogVideoX-Fun's "
                     f"mask distribution for videos, {m['image_coverage']:.0%} for images (images cache "
                     f"{', '.join(m['image_policies']) or 'none'}); each cached policy is one VAE encode and one "
                     f"latent per sample" + (f", x {m['masks_per_policy']} geometries (--masks_per_policy)"
                                             if m.get("masks_per_policy", 1) > 1 else ""))
        if "conditionings_per_clip_mean" in m:
            lines.append(f"conditionings cached per clip (views x masks per policy x policies, + t2v): "
                         f"{m['conditionings_per_clip_mean']:g} on average, at most {m['conditionings_per_clip_max']}; "
                         f"a clip shows each view with each mask set within {m['cycle_epochs_max']} epoch(s)")
    if report.get("memory"):
        lines.extend(memory_lines(report["memory"]))
    lines.extend(media_lines(report))
    return "\n".join(lines)


def media_lines(report: dict) -> list[str]:
    """Decoders other than the default, warnings, skip counts per reason, then each skip: the
    report's text form, shared with the precompute summary."""
    lines = []
    one_frame = report.get("one_frame_videos") or []
    if one_frame:
        lines.append(f"  {len(one_frame)} video(s) became 1-frame samples (a token budget of 1 frame at a large "
                     f"base, or under --bucket_rules upstream a clip of 1 to 4 frames at the stride): "
                     f"{', '.join(one_frame[:8])}" + (" ..." if len(one_frame) > 8 else ""))
    for decoder, paths in sorted(report.get("decoders", {}).items()):
        lines.append(f"  read with {decoder}: {len(paths)} source(s): {', '.join(paths[:8])}"
                     + (" ..." if len(paths) > 8 else ""))
    for w in report.get("warnings", []):
        lines.append(f"  warning {w['file_path']}: {w['warning']}")
    if report["skipped"]:
        counts = ", ".join(f"{k} {n}" for k, n in count_by_category(report["skipped"]).items())
        lines.append(f"  skipped {len(report['skipped'])} source(s) ({counts}):")
        for s in report["skipped"]:
            lines.append(f"    {s['file_path']}: {s['reason']}")
    return lines


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def plot(report: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = report["buckets"]
    names = [b["name"] for b in buckets]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.55 * len(names) + 2), 7), sharex=True)
    ax1.bar(names, [b["videos"] for b in buckets], label="videos", color="#3b75af")
    ax1.bar(names, [b["images"] for b in buckets], bottom=[b["videos"] for b in buckets], label="images",
            color="#ef8636")
    ax1.set_ylabel("samples")
    ax1.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.legend()
    t = report["total"]
    ax1.set_title(f"{t['samples']} samples in {t['buckets']} buckets, {t['skipped']} sources skipped, "
                  f"{_human(t['bytes'])}{' (est.)' if t['bytes_estimated'] else ''}")
    ax2.bar(names, [b["tokens"] for b in buckets], color="#519e3e")
    ax2.set_ylabel("tokens per sample")
    ax2.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_report(cfg: InspectConfig, buckets: list[dict]) -> dict:
    """The training-memory estimate of `cogfun.lowmem` for the model and these buckets, with the LoRA
    of train's default --rank / --network_alpha / --target_name."""
    from cogfun.config import TrainArgs
    from cogfun.lowmem import estimate_training_memory

    lora = {f.name: f.default for f in fields(TrainArgs) if f.name in ("rank", "network_alpha", "target_name")}
    shapes = sorted({(b["frames"], b["height"], b["width"]) for b in buckets})
    est = estimate_training_memory(cfg.pretrained_model_name_or_path, shapes, rank=lora["rank"],
                                   alpha=lora["network_alpha"], target_name=lora["target_name"])
    by_shape = {(r["frames"], r["height"], r["width"]): r for r in est.pop("buckets")}
    est["lora"] = lora
    est["buckets"] = {b["name"]: by_shape[(b["frames"], b["height"], b["width"])]["peak"] for b in buckets}
    return est


def memory_lines(m: dict) -> list[str]:
    gib = _human
    w = m["frozen_weight_bytes"]
    lines = [f"training memory per GPU (estimate; batch 1, --mixed_precision bf16, LoRA rank {m['lora']['rank']} "
             f"on {m['lora']['target_name']}): frozen transformer weights bf16 {gib(w['bf16'])}, float8 "
             f"{gib(w['fp8'])} ({w['fp8'] / w['bf16']:.2f}x); LoRA + gradients + AdamW {gib(m['lora_state_bytes'])}",
             f"  {'bucket (HxWxF)':>16} " + " ".join(f"{k:>20}" for k in OPTION_COLUMNS.values())]
    for name, peaks in m["buckets"].items():
        lines.append(f"  {name:>16} " + " ".join(
            f"{gib(peaks[k]['checkpointing']) + ' (' + gib(peaks[k]['no_checkpointing']) + ')':>20}" for k in OPTION_COLUMNS))
    lines.append("  with --gradient_checkpointing (without it in brackets); offload = --offload_blocks <all "
                 f"{m['blocks']} blocks>. Weights counted exactly on the meta device, activations = what autograd "
                 "keeps in one block's training forward (meta tensors, fused attention) x blocks; not counted: "
                 "CUDA context, allocator slack, single ops' transient buffers")
    return lines


OPTION_COLUMNS = dict(zip(OPTION_NAMES, ("bf16", "float8", "bf16+offload", "float8+offload")))   # option -> column


def run(cfg: InspectConfig) -> dict:
    # --shard_dir alone: the finished dir's manifest; with --train_data_meta: the dataset, probed
    # through the shard dir's probe cache
    dataset = cfg.train_data_meta or cfg.train_data_shards
    report = report_from_shards(cfg) if cfg.shard_dir and not dataset else report_from_dataset(cfg)
    if cfg.pretrained_model_name_or_path and report["buckets"]:
        report["memory"] = memory_report(cfg, report["buckets"])
    if cfg.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if cfg.plot:
        plot(report, cfg.plot)
        if not cfg.json:
            print(f"plot written to {cfg.plot}")
    return report
