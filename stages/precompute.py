"""`cogfun precompute`: clips -> VAE latents + T5 embeddings -> fingerprinted WebDataset shards.

One function, top to bottom: check what is already there (fingerprint), plan (each rank probes a
slice), encode captions (T5, then freed), encode clips (VAE, decoding in DataLoader workers),
write tars per bucket, and on rank 0 merge everything into index.parquet and, last, manifest.json.

Reruns: same fingerprint -> nothing to do (unless the dir skipped sources this run may read: a
lower --max_image_pixels, fewer media readers; they are retried, incrementally); new sources only
-> only those are probed (the dir's probe cache, cogfun.probes), planned and encoded, the finished
dir's sources and samples known from its manifest and index; a dir with complete tars and no manifest (a crash) -> those samples
are kept and the rest encoded. --overwrite of a dir made differently keeps every sample whose own
recipe (`sample_recipe`: its source, frames, resize and crop, mask geometry, and the encoder
settings) is unchanged, and encodes the rest.

Sources: a metadata file (paths or URLs; each rank stats a share) or WebDataset tars of media
(--train_data_shards; each rank lists whole tars of its own); URLs and tar members are read
through the node's media cache (cogfun.storage.MediaFetcher).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import cogfun
from cogfun import probes, shards
from cogfun.buckets import SamplePlan, Sampling, one_frame_videos
from cogfun.config import ConfigError, PrecomputeConfig, fingerprint_keys, mask_policy_list, to_dict
from cogfun.dataset import (Skipped, count_by_category, load_sources, load_tar_sources, local_media, media_report,
                            media_tars, probe_and_plan, retry_skipped, stat_paths, unique_keys, with_stats)
from cogfun.shards import ShardError
from cogfun.storage import MediaFetcher, is_url, plain_path

T5_BATCH = 16
T5_TABLE = 256  # captions per caption table file


class DecodeTimeout(Exception):
    pass


class DecodeDataset:
    """Map-style dataset: plan i -> (i, decoded pixels [3, F, H, W] in [-1, 1] or None, Skipped or
    None, warnings) (runs in workers). Each source carries its probe, which names the decoder."""

    def __init__(self, plans: list[SamplePlan], sources: dict, timeout: float, max_pixels: int, fetch=None):
        self.plans, self.sources, self.timeout, self.max_pixels = plans, sources, timeout, max_pixels
        self.fetch = fetch   # MediaFetcher: URLs and tar members are read from the node's media cache

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int):
        from cogfun import video

        plan = self.plans[i]
        src = self.sources[plan.key]
        notes: list[str] = []
        try:
            with local_media(src, self.fetch) as path:   # (outside the decode's timer: the fetch retries on its own)
                return self._decode(i, plan, src, path, notes)
        except video.MediaError as exc:
            return i, None, Skipped(plan.source, str(exc), exc.category), notes

    def _decode(self, i: int, plan: SamplePlan, src, path: str, notes: list[str]):
        from cogfun import video

        use_alarm = self.timeout > 0 and hasattr(signal, "SIGALRM")
        previous = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
        try:
            # The timer is disarmed inside the outer try: an alarm that fires just as the decode
            # finishes (even in the inner finally) is caught below, never escapes the worker.
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, self.timeout)
                frames = video.decode(path, plan.kind, list(plan.frame_indices), plan.resize_hw, plan.crop_box,
                                      media=src.media, max_pixels=self.max_pixels, notes=notes)
                return i, video.frames_to_tensor(frames), None, notes
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except (video.MediaError, ValueError) as exc:  # ValueError: the file changed since it was probed
            return i, None, Skipped(plan.source, f"decode failed: {exc}", "decode failed"), notes
        except DecodeTimeout:
            return i, None, Skipped(plan.source, f"decode timed out after {self.timeout:g} s", "timeout"), notes
        finally:
            if use_alarm:
                signal.signal(signal.SIGALRM, previous)


def _on_alarm(signum, frame):
    raise DecodeTimeout()


def _collate_one(batch):
    return batch[0]


def settings_of(cfg: PrecomputeConfig, family=None) -> dict:
    """The byte-relevant settings, normalised so that equal bytes mean equal settings.

    `family` (models.TransformerFamily): the model's frame rule (patch_size_t) and reference-noise
    design, recorded only where they apply, so shards of other models keep their fingerprint."""
    from cogfun.config import num_views_setting
    from cogfun.masks import MASK_DESIGN, reference_noise_design

    settings = {k: getattr(cfg, k) for k in fingerprint_keys(PrecomputeConfig)}
    settings["num_views"] = num_views_setting(cfg.num_views)   # "1" and 1 are the same shards
    if settings["num_views"] != "auto":
        settings.pop("max_views")                               # only --num_views auto reads it
    if settings["bucket_rules"] == "cogfun" and not (cfg.random_hw_adapt or cfg.training_with_video_token_length
                                                     or cfg.random_ratio_crop):
        # fixed bases plan as they always did: such shards keep their fingerprint
        settings.pop("bucket_rules")
        settings.pop("random_ratio_crop")
    else:   # drawn bases follow CogVideoX-Fun's lists and upscaling guard since bucket rules 2
        settings["bucket_rules_version"] = 2
    settings["mask_policies"] = mask_policy_list(cfg)
    if settings["mask_policies"]:  # the rules that draw geometries and build masks
        settings["mask_design"] = MASK_DESIGN
    if not settings["mask_policies"] or cfg.masks_per_policy == 1:
        settings.pop("masks_per_policy")   # one geometry set: the shards as before, their fingerprint kept
    # inpaint and i2v are two names of one mode (CogVideoX-Fun's): the same tensors, the same training
    settings["train_mode"] = "normal" if cfg.train_mode == "normal" else "inpaint"
    # A batched VAE encode differs from one-at-a-time in the last bits (bf16 values move), and a
    # rank's batches depend on its share of the work: the effective VAE batch is part of the bytes.
    # VAE slicing (--low_vram) encodes one sample at a time whatever the batch.
    settings["vae_batch"] = 1 if cfg.low_vram else cfg.vae_mini_batch
    if family is not None and family.latent_multiple > 1:
        settings["latent_frame_multiple"] = family.latent_multiple
    if family is not None and family.reference_noise and settings["mask_policies"]:
        settings["reference_noise"] = reference_noise_design()
    return settings


#: model identity entries that only the caption embeddings depend on
TEXT_PARTS = ("text_encoder_sha256", "tokenizer_sha256", "text_dim")


def encode_recipe(parts: dict) -> str:
    """Digest of what every sample's tensors depend on besides its own plan: the fingerprint's
    settings without those that only decide plans (`Sampling`'s flags but the seed, which also draws
    mask geometry and reference noise), the VAE's identity, the format."""
    plan_only = set(Sampling.__dataclass_fields__) - {"seed"}
    return shards.digest({"format_version": parts["format_version"],
                          "settings": {k: v for k, v in parts["settings"].items() if k not in plan_only},
                          "model": {k: v for k, v in parts["model"].items() if k not in TEXT_PARTS}})


def text_recipe(parts: dict) -> str:
    """Digest of what the caption tables depend on: T5 and tokenizer, precision, format."""
    return shards.digest({"format_version": parts["format_version"],
                          "precision": parts["settings"].get("mixed_precision"),
                          "model": {k: parts["model"].get(k) for k in TEXT_PARTS}})


def mask_sets(policies: list[str], plan: SamplePlan, *, seed: int, variants: int) -> list[dict]:
    """A sample's --masks_per_policy geometry sets ({policy: geometry} each; set 0 is the one cogfun
    always drew)."""
    from cogfun.masks import draw_geometries

    return [draw_geometries(policies, plan.frames, plan.height, plan.width, seed=seed, key=plan.key, variant=k)
            for k in range(variants)]


def mask_record(sets: list[dict], views: int) -> dict:
    """What a sample's json records of its geometry sets: `masks` (train rebuilds each mask from it)
    and, with several sets, the others and the clip's view count that cycles them (cogfun.loader)."""
    record = {"masks": sets[0]}
    if len(sets) > 1:
        record.update(mask_variants=sets[1:], views=views)
    return record


def recipe_masks(sets: list[dict], views: int) -> dict:
    """The mask part of a sample's recipe: its one geometry set, or with several the whole record."""
    return sets[0] if len(sets) == 1 else mask_record(sets, views)


def sample_recipe(plan: SamplePlan, geometry: dict, source_digest: str, encode: str) -> str:
    """Digest of everything one sample's tensors are made from (stored in its json as `recipe`):
    --overwrite keeps a sample on disk whose recipe is the one the new plan gives."""
    return shards.digest({"encode": encode, "input": source_digest, "kind": plan.kind, "view": plan.view,
                          "base": plan.base, "frame_indices": list(plan.frame_indices),
                          "resize_hw": list(plan.resize_hw), "crop_box": list(plan.crop_box),
                          "size": [plan.frames, plan.height, plan.width], "masks": geometry})


def check_draw_weights(cfg, policies: list[str]) -> None:
    """--mask_policy_weights that training would refuse with these policies cached, refused now."""
    from cogfun.masks import draw_weights

    try:
        draw_weights(policies, cfg.mask_policy_weights, frame_crop=cfg.random_frame_crop,
                     cached_by="these --mask_policies")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_existing(shard_dir: Path, parts: dict, fp: str, inputs: dict, overwrite: bool,
                   max_image_pixels: int) -> str:
    """Decide what to do with what is in `shard_dir`: 'up_to_date', 'fresh', 'resume', 'incremental'
    (also when the dir is up to date but skipped sources this cogfun may now read: retry_skipped) or
    'overwrite'.

    Raises ShardError (listing what differs) when the dir was made differently and --overwrite
    is not given. With --overwrite: 'overwrite' (the samples whose recipe is unchanged are kept,
    see `sample_recipe`), or, for entries without a manifest or a record of their settings, the dir
    is emptied ('fresh').
    """
    # an older format's manifest is compared too: its format_version differs, so it needs --overwrite
    manifest = shards.read_manifest(shard_dir, check_version=False)
    intent_path = shard_dir / shards.INTENT
    if manifest is not None:
        if manifest["fingerprint"] == fp:
            missing = [s for s in manifest["shards"] if not (shard_dir / s).is_file()]
            if missing and overwrite:
                return "overwrite"   # the samples of the tars still there are kept
            if missing:
                raise ShardError(f"{shard_dir}: the manifest lists {len(missing)} tar(s) that are gone "
                                 f"(e.g. {missing[0]}); re-run with --overwrite to rebuild the shard dir")
            return "incremental" if retry_skipped(manifest, max_image_pixels) else "up_to_date"
        old_parts = manifest["fingerprint_parts"]
        diffs = shards.describe_differences(old_parts, parts)
        added, removed, changed = shards.input_changes(manifest["inputs"], inputs)
        if not diffs and not removed and not changed:
            return "incremental"
        problems = diffs + [f"source removed: {p}" for p in removed[:20]] + \
            [f"source changed (size, mtime, caption or type): {p}" for p in changed[:20]]
    elif intent_path.exists():
        intent = json.loads(intent_path.read_text())
        problems = shards.describe_differences(intent["fingerprint_parts"], parts)
        if not problems:
            return "resume"
    else:
        leftovers = [p for p in shard_dir.iterdir() if not p.name.startswith(".") and p.name != probes.PROBES
                     ] if shard_dir.exists() else []
        if leftovers:
            problems = [f"{shard_dir} holds {len(leftovers)} entries but no manifest and no record of the "
                        f"settings that made them (e.g. {leftovers[0].name})"]
        else:
            return "fresh"
    if not overwrite:
        raise ShardError(f"{shard_dir} was made with different settings, model or sources:\n  "
                         + "\n  ".join(problems)
                         + "\nUse another --shard_dir, or --overwrite to replace it (samples whose own inputs "
                           "did not change are kept).")
    if manifest is None and not intent_path.exists():
        wipe(shard_dir)
        return "fresh"
    return "overwrite"


def wipe(shard_dir: Path) -> None:
    import shutil

    for p in shard_dir.iterdir():
        if p.name in (shards.HASH_CACHE, probes.PROBES):   # keyed by the model's / the media files' identity
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def precompute(cfg: PrecomputeConfig, *, progress: bool = True) -> dict:
    """Run the precompute stage; returns the summary (also printed on rank 0)."""
    import torch

    from cogfun import dist, models
    from cogfun.masks import MASK_DESIGN, encode_conditioning, reference_noise_design
    from cogfun.video import MEDIA_READERS

    t_start = time.time()
    # ------------------------------------------------------------ setup and checks
    for flag in ("pretrained_model_name_or_path", "shard_dir"):
        if not getattr(cfg, flag):
            raise ShardError(f"--{flag} is required")
    if bool(cfg.train_data_meta) == bool(cfg.train_data_shards):
        raise ShardError("give --train_data_meta (a metadata file) or --train_data_shards (WebDataset tars of "
                         "media), one of the two")
    if is_url(cfg.shard_dir):
        raise ShardError(f"--shard_dir {cfg.shard_dir}: precompute writes to a local or shared filesystem, not a "
                         f"URL. Precompute into a directory, upload it (e.g. `aws s3 sync DIR s3://bucket/DIR`, or "
                         f"serve it over HTTP), and give the URL to `cogfun train` / `inspect-buckets`.")
    state = dist.partial_state()
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    shard_dir = Path(plain_path(cfg.shard_dir))   # file:///x is /x, as the readers (fsspec) see it
    # frame rule, reference noise; refuses a --train_mode (or a VAE / T5) the transformer does not fit
    family = models.check_model_fits(cfg.pretrained_model_name_or_path, cfg.train_mode)
    models.check_position_frames(family.position_frames, cfg.video_sample_n_frames, "--video_sample_n_frames")
    sampling = Sampling.from_config(cfg, latent_multiple=family.latent_multiple)
    sampling.validate()
    policies = mask_policy_list(cfg)
    check_draw_weights(cfg, policies)
    reference_noise = family.reference_noise and bool(policies)
    fetch = MediaFetcher.from_config(cfg)   # URLs and tar members: through the node's media cache
    if cfg.train_data_shards:   # each rank lists (fetching) whole tars of its own; all ranks learn every source
        tars = media_tars(cfg.train_data_shards)
        order = {t: i for i, t in enumerate(tars)}
        listed, row_skips = load_tar_sources(tars[rank::world], cfg.train_data_caption_key, fetch,
                                             listings=shard_dir)   # a tar listed before is not read again
        sources, dup_skips = unique_keys(sorted(dist.gather(listed, state), key=lambda s: (
            order[s.path.partition("#")[0]], s.member_offset)))
        row_skips = dist.gather(row_skips, state) + dup_skips
        mine = [s for s in sources if order[s.path.partition("#")[0]] % world == rank]
    else:
        sources, row_skips = load_sources(cfg.train_data_meta, cfg.train_data_dir, fetch, stat=False)
        # each rank stats (local) or asks for the size and version of (URLs) a share of the files
        stats = dist.gather(list(stat_paths(sorted({s.path for s in sources[rank::world]}), fetch).items()), state)
        sources = with_stats(sources, dict(stats))
        fetch.check_fits({s.path: s.size for s in sources if is_url(s.path)})   # fail early, on every rank
        mine = sources[rank::world]

    inputs = {s.identity: shards.digest(s.digest_fields()) for s in sources}
    if main:
        shard_dir.mkdir(parents=True, exist_ok=True)
        identity = models.model_identity(cfg.pretrained_model_name_or_path, shard_dir / shards.HASH_CACHE)
    identity = dist.broadcast(identity if main else None, state)
    parts = shards.fingerprint_parts(settings_of(cfg, family), identity, inputs)
    fp = shards.fingerprint(parts)
    decision = None
    if main:
        try:
            decision = check_existing(shard_dir, parts, fp, inputs, cfg.overwrite, cfg.max_image_pixels)
        except ShardError as exc:
            decision = exc
    decision = dist.broadcast(decision, state)
    if isinstance(decision, Exception):
        raise decision
    if decision == "up_to_date":
        manifest = shards.require_manifest(shard_dir)
        summary = {"status": "up to date", "fingerprint": fp, "samples": manifest["num_samples"],
                   "encoded": 0, "seconds": round(time.time() - t_start, 2)}
        if main:
            print(f"{shard_dir}: up to date (fingerprint {fp[:12]}), {manifest['num_samples']} samples; nothing to encode")
        return summary
    on_disk: list = []  # rank 0: the samples of the complete tars, scanned once per run
    committed: dict[str, int] = {}   # incremental: the finished dir's tars, known from its index (not scanned)
    done: set[str] = set()   # incremental: sources the finished dir holds as they are now (not planned again)
    carried: dict = {}       # ... and their lines of the media report
    if main:
        shards.remove_partial(shard_dir)
        if decision == "incremental":
            old = shards.require_manifest(shard_dir)
            committed = old["shards"]
            on_disk = shards.rows_from_index(shard_dir, committed)
            file_of = {s.identity: s.file_path for s in sources}
            skipped_files = {s["file_path"] for s in old["skipped"]}   # (skipped: probed and planned again)
            done = {i for i, d in old["inputs"].items() if inputs.get(i) == d and file_of[i] not in skipped_files}
            done_files = {file_of[i] for i in done}
            carried = {"decoders": {k: [f for f in v if f in done_files] for k, v in old.get("decoders", {}).items()},
                       "warnings": [w for w in old.get("warnings", []) if w["file_path"] in done_files]}
        on_disk += shards.scan_shards(shard_dir, skip=set(committed))
        if decision in ("resume", "incremental"):
            # complete tars of an interrupted run whose sources changed since: not reused
            stale = shards.remove_stale(shard_dir, on_disk, inputs, keep=set(committed))
            on_disk = [r for r in on_disk if r.shard not in stale]
            if stale:
                print(f"{shard_dir}: removed {len(stale)} unfinished tar(s) holding samples of sources that "
                      f"changed or were removed since they were written; their samples are encoded again")
        if decision == "overwrite":  # what the dir was made with (read before the new intent replaces it)
            old = shards.read_manifest(shard_dir, check_version=False)
            old_parts = (old or json.loads((shard_dir / shards.INTENT).read_text()))["fingerprint_parts"]
        if decision != "incremental":
            shards.write_json_atomic(shard_dir / shards.INTENT, {"fingerprint_parts": parts})
    state.wait_for_everyone()

    # ------------------------------------------------------------ plan: each rank probes a slice
    done = dist.broadcast(done if main else None, state)
    mine = [s for s in mine if s.identity not in done]
    cache = probes.load(shard_dir, paths={s.path for s in mine})   # files probed by an earlier run: not again
    plans, probe_skips, by_key = probe_and_plan(mine, sampling, workers=cfg.probe_workers,
                                                progress=progress and main, max_pixels=cfg.max_image_pixels,
                                                cache=cache, fetch=fetch)
    probes.save(shard_dir, cache)
    n_probed = dist.gather([(len(cache.new), cache.hits)], state)
    all_plans = sorted(dist.gather(plans, state), key=lambda p: p.key)
    all_skips = dist.gather(probe_skips, state)
    probed = dist.gather(list({s.identity: s for s in by_key.values()}.values()), state)  # for the report
    encode = encode_recipe(parts)
    if decision == "overwrite" and main:  # keep the samples whose own recipe is unchanged; encode the rest
        variants, views_of = cfg.masks_per_policy if policies else 1, Counter(p.identity for p in all_plans)
        recipes = {p.key: sample_recipe(p, recipe_masks(mask_sets(policies, p, seed=cfg.seed, variants=variants),
                                                        views_of[p.identity]), inputs[p.identity], encode)
                   for p in all_plans}
        keep: dict[str, tuple[str, int]] = {}
        for r in on_disk:
            if r.key in recipes and r.meta.get("recipe") == recipes[r.key]:
                keep.setdefault(r.key, (r.shard, r.position))
        dropped = shards.keep_only(shard_dir, on_disk, set(keep.values()), run_id=uuid.uuid4().hex[:8])
        on_disk = shards.scan_shards(shard_dir)
        print(f"{shard_dir}: --overwrite keeps {len(keep)} sample(s) whose source, frames, crop, masks and encoder "
              f"settings are unchanged; {dropped} sample(s) removed, {len(all_plans) - len(keep)} to encode")
        if text_recipe(old_parts) != text_recipe(parts):
            for table in (shard_dir / shards.PROMPTS).glob("*.safetensors"):
                table.unlink()
            print(f"{shard_dir}: the text encoder, tokenizer or precision changed: every caption is encoded again")
    state.wait_for_everyone()
    present = dist.broadcast({r.key for r in on_disk} if main else None, state)
    # my work: the planned samples of my own slice that are not on disk yet
    work = sorted((p for p in plans if p.key not in present), key=lambda p: (p.bucket, p.key))
    n_work_total = sum(dist.gather([len(work)], state))

    # ------------------------------------------------------------ T5: each distinct caption once, then free it
    device = state.device
    dtype = models.dtype_of(cfg.mixed_precision)
    run_id = uuid.uuid4().hex[:8]
    caption_of = {k: src.text for k, src in by_key.items()}
    tabled = dist.broadcast(set(shards.prompt_tables_on_disk(shard_dir)) if main else None, state)
    wanted = sorted(set(dist.gather(sorted({caption_of[p.key] for p in plans}), state)))
    # the captions no table holds yet, shared out over the ranks (each is encoded exactly once)
    captions = [c for c in wanted if shards.prompt_key(c) not in tabled][rank::world] + ([""] if main else [])
    null_prompt = None
    table_bytes = 0
    if captions:
        tokenizer, encoder = models.load_text_encoder(cfg.pretrained_model_name_or_path, dtype, device,
                                                      offload=cfg.low_vram)
        (shard_dir / shards.PROMPTS).mkdir(exist_ok=True)
        table: dict[str, torch.Tensor] = {}
        for i in range(0, len(captions), T5_BATCH):
            chunk = captions[i:i + T5_BATCH]
            emb = models.encode_prompts(tokenizer, encoder, chunk).to("cpu", torch.bfloat16)
            for j, text in enumerate(chunk):
                if main and i + j == len(captions) - 1:   # rank 0's extra, last: the empty caption
                    null_prompt = emb[j].clone()
                else:
                    table[shards.prompt_key(text)] = emb[j].clone()
            if table and (len(table) >= T5_TABLE or i + T5_BATCH >= len(captions)):
                final = shard_dir / shards.PROMPTS / f"{rank:03d}-{run_id}-{i:07d}.safetensors"
                shards.save_tensors(table, final)   # atomic: no partial table left behind
                table_bytes += final.stat().st_size
                table = {}
        del tokenizer, encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------ VAE: decode in workers, encode, write
    writers = shards.BucketWriters(shard_dir, rank, run_id, cfg.shard_max_samples)
    decode_skips: list[Skipped] = []
    decode_notes: list[tuple[str, str]] = []
    n_encoded = 0
    if work:
        from tqdm import tqdm

        vae = models.load_vae(cfg.pretrained_model_name_or_path, dtype, device, slicing=cfg.low_vram)
        loader = torch.utils.data.DataLoader(
            DecodeDataset(work, by_key, cfg.decode_timeout, cfg.max_image_pixels, fetch), batch_size=1, shuffle=False,
            num_workers=cfg.dataloader_num_workers, collate_fn=_collate_one,
            prefetch_factor=4 if cfg.dataloader_num_workers > 0 else None)
        variants = cfg.masks_per_policy if policies else 1
        views_of = Counter(p.identity for p in plans)   # a clip's views are planned on one rank

        def flush(batch: list[tuple[SamplePlan, torch.Tensor]]):
            pixels = torch.stack([px for _, px in batch])
            mean, logvar = models.encode_clips(vae, pixels)
            # --masks_per_policy K: K seeded geometry sets per sample (set 0 is the one cogfun always drew)
            sets = [mask_sets(policies, plan, seed=cfg.seed, variants=variants) for plan, _ in batch]
            conditioning = {}
            for k in range(variants):
                conditioning.update(encode_conditioning(lambda px: models.encode_clips(vae, px)[0], pixels,
                                                        [own[k] for own in sets], keys=[plan.key for plan, _ in batch],
                                                        seed=cfg.seed, reference_noise=reference_noise, variant=k))
            for b, (plan, _) in enumerate(batch):
                text = caption_of[plan.key]
                tensors = {"latent_mean": mean[b], "latent_logvar": logvar[b]}
                for name, value in conditioning.items():
                    tensors[name] = value[b]
                tensors = {k: v.to("cpu", torch.bfloat16).clone() for k, v in tensors.items()}  # own storage each
                meta = {"source": plan.source, "identity": plan.identity, "caption": text,
                        "prompt": shards.prompt_key(text), "kind": plan.kind,
                        "bucket": plan.bucket, "decoder": by_key[plan.key].media.decoder,
                        "view": plan.view, "base": plan.base, "frame_indices": list(plan.frame_indices),
                        "fps": by_key[plan.key].fps, "resize_hw": list(plan.resize_hw),
                        "crop_box": list(plan.crop_box),
                        "frames": plan.frames, "height": plan.height, "width": plan.width,
                        "latent_frames": plan.latent_frames, "tokens": plan.tokens,
                        "input": inputs[plan.identity],  # the source's digest: stale leftovers are spotted
                        "recipe": sample_recipe(plan, recipe_masks(sets[b], views_of[plan.identity]),
                                                inputs[plan.identity], encode)}
                if policies:
                    meta.update(mask_record(sets[b], views_of[plan.identity]))
                writers.write(plan.bucket, shards.encode_sample(plan.key, meta, tensors))

        bar = tqdm(total=n_work_total, desc="precompute", unit="clip", disable=not (progress and main),
                   dynamic_ncols=True)
        batch: list = []
        try:
            for i, pixels, skip, notes in loader:
                plan = work[i]
                decode_notes.extend((plan.source, n) for n in notes)
                if pixels is None:
                    decode_skips.append(skip)
                else:
                    if batch and batch[0][0].bucket != plan.bucket:
                        flush(batch)
                        batch = []
                    batch.append((plan, pixels))
                    if len(batch) >= cfg.vae_mini_batch:
                        flush(batch)
                        batch = []
                    n_encoded += 1
                bar.update(world)  # ranks progress at about the same rate
            if batch:
                flush(batch)
        except BaseException:
            writers.abort()  # e.g. disk full: drop the unfinished tars now, quietly
            raise
        bar.close()
    black = None
    if main and policies:  # the all -1 clip's latents of every bucket (the reference's 10 % of t2v steps)
        black = black_latents(shard_dir, all_plans, lambda: vae if work else models.load_vae(
            cfg.pretrained_model_name_or_path, dtype, device, slicing=cfg.low_vram))
    vae = None
    writers.close()
    all_decode_skips = dist.gather(decode_skips, state)
    all_decode_notes = dist.gather(decode_notes, state)
    n_encoded_total = sum(dist.gather([n_encoded], state))
    bytes_total = sum(dist.gather([writers.bytes_written + table_bytes], state))
    state.wait_for_everyone()

    # ------------------------------------------------------------ merge on rank 0: index, manifest last
    summary: dict = {}
    if main:
        if null_prompt is None:
            raise RuntimeError("internal error: rank 0 did not encode the empty caption")
        planned = {p.key for p in all_plans} | {r.key for r in on_disk if r.shard in committed}
        failed = {s.file_path for s in all_decode_skips}
        rows_all = on_disk + shards.scan_shards(shard_dir, skip={r.shard for r in on_disk})  # + this run's tars
        nsamples: dict[str, int] = dict(committed)
        for r in rows_all:
            nsamples[r.shard] = max(nsamples.get(r.shard, 0), r.position + 1)
        rows = [r for r in rows_all if r.key in planned]
        counts = Counter(r.key for r in rows)
        dup = sorted(k for k, n in counts.items() if n > 1)[:5]
        if dup:
            raise ShardError(f"{shard_dir}: samples stored twice ({', '.join(dup)}); re-run with --overwrite")
        missing = sorted(planned - set(counts) - {p.key for p in all_plans if p.source in failed})
        if missing:
            raise ShardError(f"{shard_dir}: {len(missing)} planned samples were not written (e.g. {missing[0]}); "
                             f"re-run the same command to finish them")
        table_of = shards.prompt_tables_on_disk(shard_dir)
        untabled = sorted({r.meta["caption"] for r in rows if r.meta["prompt"] not in table_of})
        if untabled:
            raise ShardError(f"{shard_dir}: {len(untabled)} caption(s) have no T5 embedding in {shards.PROMPTS}/ "
                             f"(e.g. {untabled[0]!r}); re-run the same command to finish them")
        used_tables = sorted({table_of[r.meta["prompt"]] for r in rows})
        for unused in sorted(set(table_of.values()) - set(used_tables)):   # captions no sample uses any more
            (shard_dir / unused).unlink()
        shards.save_tensors({"prompt_embeds": null_prompt}, shard_dir / shards.NULL_PROMPT)
        if black is not None:
            black = {k: v for k, v in black.items() if k in {r.bucket for r in rows}}
            shards.save_tensors(black, shard_dir / shards.BLACK_LATENTS)
        shards.write_index(shard_dir, rows, table_of)
        buckets: dict[str, dict] = {}
        for r in rows:
            b = buckets.setdefault(r.bucket, {"count": 0, "height": r.meta["height"], "width": r.meta["width"],
                                              "frames": r.meta["frames"], "latent_frames": r.meta["latent_frames"],
                                              "tokens": r.meta["tokens"], "shards": set()})
            b["count"] += 1
            b["shards"].add(r.shard)
        for b in buckets.values():
            b["shards"] = sorted(b["shards"])
        skipped = sorted({(s.file_path, s.reason, s.category) for s in row_skips + all_skips + all_decode_skips})
        media = media_report(probed, all_decode_notes)  # decoders other than the default, warnings
        for decoder, files in carried.get("decoders", {}).items():
            media["decoders"][decoder] = sorted(set(media["decoders"].get(decoder, [])) | set(files))
        media["decoders"] = {k: v for k, v in sorted(media["decoders"].items()) if v}
        warnings = {(w["file_path"], w["warning"]) for w in media["warnings"] + carried.get("warnings", [])}
        media["warnings"] = [{"file_path": f, "warning": w} for f, w in sorted(warnings)]
        config = to_dict(cfg)
        config.pop("overwrite", None)
        manifest = {
            "format_version": shards.FORMAT_VERSION, "fingerprint": fp, "fingerprint_parts": parts,
            "inputs": inputs, "config": config, "model": identity, "mask_policies": policies,
            "mask_design": MASK_DESIGN if policies else None,
            "transformer": {"in_channels": family.in_channels, "patch_size_t": family.patch_size_t,
                            "add_noise_in_inpaint_model": family.reference_noise},
            "latent_frame_multiple": family.latent_multiple,
            "reference_noise": reference_noise_design() if reference_noise else None,
            "text_len": models.TEXT_LEN, "buckets": buckets,
            "shards": {s: nsamples[s] for s in sorted({r.shard for r in rows})},
            "shard_bytes": {s: (shard_dir / s).stat().st_size for s in sorted({r.shard for r in rows})},
            "prompt_tables": {t: (shard_dir / t).stat().st_size for t in used_tables},
            "num_samples": len(rows), "num_sources": len(sources) + len(row_skips),
            "skipped": [{"file_path": f, "reason": r, "category": c} for f, r, c in skipped],
            "skipped_by_reason": count_by_category([{"category": c} for _, _, c in skipped]),
            "one_frame_videos": one_frame_videos(p for p in all_plans if p.source not in failed),
            "decoders": media["decoders"], "warnings": media["warnings"], "media_readers": MEDIA_READERS,
            "cogfun_version": cogfun.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        shards.write_json_atomic(shard_dir / shards.MANIFEST, manifest)
        (shard_dir / shards.INTENT).unlink(missing_ok=True)
        probes.merge(shard_dir, keep={(s.path, s.size, s.mtime_ns, s.kind) for s in sources})
        seconds = time.time() - t_start
        summary = {"status": decision, "fingerprint": fp, "samples": len(rows), "encoded": n_encoded_total,
                   "buckets": {k: v["count"] for k, v in sorted(buckets.items())},
                   "skipped": manifest["skipped"], "skipped_by_reason": manifest["skipped_by_reason"],
                   "one_frame_videos": manifest["one_frame_videos"], "decoders": media["decoders"], "warnings": media["warnings"],
                   "bytes_written": bytes_total, "seconds": round(seconds, 2),
                   "probed": sum(n for n, _ in n_probed), "probes_cached": sum(h for _, h in n_probed)}
        print_summary(shard_dir, summary)
    state.wait_for_everyone()
    return summary


def black_latents(shard_dir: Path, plans: list[SamplePlan], get_vae) -> dict:
    """{bucket: latents [F', C, h, w]} of an all -1 clip for every bucket of `plans`: those already in
    the shard dir kept, the others encoded with `get_vae()` (called only when one is missing)."""
    import torch
    from safetensors.torch import load_file

    from cogfun import models
    from cogfun.masks import black_clip

    path = shard_dir / shards.BLACK_LATENTS
    have = load_file(str(path)) if path.is_file() else {}
    vae = None
    for plan in sorted({p.bucket: p for p in plans}.values(), key=lambda p: p.bucket):
        if plan.bucket not in have:
            vae = vae or get_vae()
            mean = models.encode_clips(vae, black_clip(plan.frames, plan.height, plan.width))[0][0]
            have[plan.bucket] = mean.to("cpu", torch.bfloat16).contiguous()
    return have


def print_summary(shard_dir: Path, s: dict) -> None:
    rate = s["encoded"] / s["seconds"] if s["seconds"] else 0.0
    print(f"{shard_dir}: {s['status']}: {s['samples']} samples in {len(s['buckets'])} buckets; "
          f"encoded {s['encoded']} now ({rate:.2f} clips/s), {s['bytes_written'] / 1e6:.2f} MB written "
          f"in {s['seconds']:.1f} s; fingerprint {s['fingerprint'][:12]}")
    from cogfun.inspect import media_lines

    if "probed" in s:
        print(f"  probed {s['probed']} file(s); {s['probes_cached']} known from {probes.PROBES}/ (not probed again)")
    for name, count in s["buckets"].items():
        print(f"  {name:>16}  {count} samples")
    for line in media_lines(s):
        print(line)
