"""Validation videos during training and the held-out eval loss: 2-process DDP and FSDP launches,
T5 never in the training process, the VAE only while validating, files with the user's umask."""

import functools
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cogfun.config import ConfigError, PrecomputeConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_sample import read_mp4  # noqa: E402
from test_train import LAUNCHES, run_cli  # noqa: E402

DATA = dict(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
            video_sample_stride=2, enable_bucket=True, train_mode="inpaint", mask_policies="i2v,first_last",
            num_views=2, seed=42)
PROMPTS = ["A red fox runs across the meadow.", "A golden owl sleeps near the old bridge.", "A small boat drifts."]
VALIDATION = dict(validation_steps=2, validation_num_frames=9, validation_height=48, validation_width=64,
                  validation_num_inference_steps=2, eval_samples=1.0, eval_steps=2)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def subset_dataset(synthetic_data: Path, root: Path, names: list[str]) -> Path:
    """A dataset of some of the synthetic files (same files, fewer rows)."""
    rows = [r for r in json.loads(synthetic_data.read_text()) if Path(r["file_path"]).name in names]
    meta = root / "metadata.json"
    root.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(rows))
    return meta


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_inp, synthetic_data):
    from accelerate.state import AcceleratorState

    from cogfun.stages.precompute import precompute

    root = tmp_path_factory.mktemp("validation")
    meta = subset_dataset(synthetic_data, root / "data", ["landscape.mp4", "portrait.mp4", "square.png"])
    precompute(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model_inp), train_data_meta=str(meta),
                                train_data_dir=str(synthetic_data.parent), shard_dir=str(root / "shards"),
                                mixed_precision="no", dataloader_num_workers=0, **DATA), progress=False)
    AcceleratorState._reset_state(True)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    image = str(synthetic_data.parent / "images" / "landscape.jpg")
    return {"root": root, "model": tiny_model_inp, "shards": root / "shards", "prompts": prompts, "image": image}


def flags(setup, out: Path, steps=4) -> list[str]:
    args = ["train", "--pretrained_model_name_or_path", str(setup["model"]), "--shard_dir", str(setup["shards"]),
            "--output_dir", str(out), "--max_train_steps", str(steps), "--checkpointing_steps", "2",
            "--train_mode", "inpaint", "--mixed_precision", "no", "--rank", "4", "--network_alpha", "2",
            "--learning_rate", "1e-2", "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "42",
            "--validation_prompts", str(setup["prompts"]), "--validation_images", setup["image"]]
    for key, value in VALIDATION.items():
        args += [f"--{key}", str(value)]
    return args


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def encoded_inputs(setup):
    """The validation inputs of `flags`, encoded here once (what the side process of a first run writes)."""
    from cogfun import sampling, validation

    cfg = TrainConfig(pretrained_model_name_or_path=str(setup["model"]), validation_prompts=str(setup["prompts"]),
                      validation_images=setup["image"], mixed_precision="no", seed=42, **VALIDATION,
                      **{k: v for k, v in DATA.items() if k != "seed"})
    _, _, spec = validation.inputs_spec(cfg, setup["root"] / "encoded", "cpu")
    sampling.run_spec(spec)
    return setup["root"] / "encoded" / validation.VALIDATION_DIR


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_validation_videos_and_eval_loss_on_two_processes(setup, encoded_inputs, kind):
    launch, env = LAUNCHES[kind]
    out = setup["root"] / kind
    shutil.copytree(encoded_inputs, out / "validation")   # a rerun with the same prompts, images, size, weights
    res = run_cli(flags(setup, out), launch=launch, env=env)
    assert "encoded by a separate T5 process" not in res.stdout   # reused, no T5 at all
    for step in (2, 4):  # 3 prompts on 2 ranks: one rank renders 2, the other 1 (+ a padding one under FSDP)
        folder = out / "samples" / f"step-{step}"
        index = json.loads((folder / "index.json").read_text())
        assert [v["prompt"] for v in index["videos"]] == PROMPTS
        for entry in index["videos"]:
            video = read_mp4(folder / entry["file"])
            assert video["codec"] == "h264" and video["frames"].shape == (9, 48, 64, 3) and video["fps"] == 8
    rows = log_rows(out)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [0, 2, 4] and all(np.isfinite(list(evals.values())))
    assert json.loads((out / "run_config.json").read_text())["eval_samples_held_out"] == 2
    if kind == "fsdp":
        # the video of step 4 is what `cogfun sample` makes with checkpoint-4's LoRA (one code path)
        from cogfun.config import SampleConfig
        from cogfun.stages.sample import sample

        first = out / "samples" / "step-4" / json.loads((out / "samples/step-4/index.json").read_text())["videos"][0]["file"]
        mine = out / "sampled.mp4"
        sample(SampleConfig(pretrained_model_name_or_path=str(setup["model"]), lora=str(out / "checkpoint-4"),
                            prompt=PROMPTS[0], image=setup["image"], num_frames=9, height=48, width=64,
                            num_inference_steps=2, guidance_scale=4.5, seed=42, mixed_precision="no",
                            output=str(mine)))
        diff = np.abs(read_mp4(mine)["frames"].astype(int) - read_mp4(first)["frames"])
        assert diff.mean() < 0.5, diff.mean()


def test_training_process_never_builds_t5_and_builds_the_vae_only_to_validate(setup, tmp_path, monkeypatch, capsys):
    """In process, TensorBoard on, umask 027: T5 and the VAE constructors are watched; then a resume
    reuses the encoded prompts and reproduces the eval loss."""
    import diffusers
    import transformers

    from cogfun import validation
    from cogfun.stages.train import train

    state = {"validating": False, "vae_built": 0}

    def no_t5(self, *a, **k):
        raise AssertionError("T5EncoderModel constructed in the training process")

    vae_init = diffusers.AutoencoderKLCogVideoX.__init__

    @functools.wraps(vae_init)  # keeps the signature diffusers' config machinery reads
    def watched_vae(self, *a, **k):
        assert state["validating"], "the VAE was constructed outside validation"
        state["vae_built"] += 1
        vae_init(self, *a, **k)

    render = validation.render

    def watched_render(*a, **k):
        state["validating"] = True
        try:
            return render(*a, **k)
        finally:
            state["validating"] = False

    monkeypatch.setattr(transformers.T5EncoderModel, "__init__", no_t5)
    monkeypatch.setattr(diffusers.AutoencoderKLCogVideoX, "__init__", watched_vae)
    monkeypatch.setattr(validation, "render", watched_render)
    out = tmp_path / "out"
    cfg = dict(pretrained_model_name_or_path=str(setup["model"]), shard_dir=str(setup["shards"]), output_dir=str(out),
               max_train_steps=4, checkpointing_steps=2, mixed_precision="no", rank=4, network_alpha=2.0,
               learning_rate=1e-2, dataloader_num_workers=0, report_to="tensorboard",
               validation_prompts=" | ".join(PROMPTS[:2]), **VALIDATION, **DATA)
    old = os.umask(0o027)
    try:
        train(TrainConfig(**cfg))
    finally:
        os.umask(old)
    assert "encoded by a separate T5 process" in capsys.readouterr().out
    assert state["vae_built"] == 2          # validations at steps 2 and 4, one VAE each
    for path in [out / "pytorch_lora_weights.safetensors", out / "pytorch_lora_weights_kohya.safetensors",
                 out / "train_log.jsonl", out / "run_config.json", out / "validation" / "inputs.safetensors",
                 *(out / "checkpoint-2").iterdir(), *(out / "samples" / "step-4").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o640, path   # the umask, not safetensors' 0600
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "cogfun"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["validation/00-a-red-fox-runs-across-the-meadow",
                                               "validation/01-a-golden-owl-sleeps-near-the-old-bridge"]
    assert "eval_loss" in events.Tags()["scalars"]
    first = {r["step"]: r.get("eval_loss") for r in log_rows(out)}

    train(TrainConfig(**{**cfg, "resume_from_checkpoint": str(out / "checkpoint-2"), "report_to": "none"}))
    assert "encoded by a separate T5 process" not in capsys.readouterr().out   # same prompts: the cache
    again = {r["step"]: r.get("eval_loss") for r in log_rows(out)}
    assert again[4] == pytest.approx(first[4], rel=1e-6) and again[0] == first[0]


def learnable_model(src: Path, dst: Path) -> Path:
    """The tiny t2v model, made one that a LoRA can overfit quickly: a transformer 4x wider than its
    patches (2 x 2 x 16 = 64 values, so the noise can pass through) and a VAE whose posterior is
    narrow like a real one's (logvar -12; the random tiny VAE's is ~0, i.e. std 1 on latents of std 0.3)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from cogfun.tiny import transformer_config

    shutil.copytree(src, dst)
    vae = AutoencoderKLCogVideoX.from_pretrained(dst / "vae")
    with torch.no_grad():
        vae.encoder.conv_out.conv.weight[16:] = 0
        vae.encoder.conv_out.conv.bias[16:] = -12.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = CogVideoXTransformer3DModel(**{**transformer_config("t2v"), "num_attention_heads": 4,
                                                     "attention_head_dim": 32, "time_embed_dim": 64})
    for name, part in (("vae", vae), ("transformer", transformer)):
        shutil.rmtree(dst / name)
        part.save_pretrained(dst / name, safe_serialization=True)
    return dst


def test_eval_loss_halves_when_overfitting_one_clip(tmp_path, tiny_model_t2v):
    """One 9-frame clip in two files: one file held out, the other trained on until memorised.
    (A random tiny transformer must learn denoising itself: the LoRA also covers its output layers.)"""
    from cogfun.tiny import synthetic_frames
    from cogfun.video import write_mp4
    from cogfun.stages.precompute import precompute
    from cogfun.stages.train import train

    model = learnable_model(tiny_model_t2v, tmp_path / "model")
    data = tmp_path / "data"
    for name in ("clip.mp4", "copy.mp4"):
        write_mp4(data / name, synthetic_frames(64, 64, 9, seed=5), 8)
    (data / "metadata.json").write_text(json.dumps([{"file_path": name, "text": "a square", "type": "video"}
                                                    for name in ("clip.mp4", "copy.mp4")]))
    common = dict(pretrained_model_name_or_path=str(model), shard_dir=str(tmp_path / "shards"),
                  mixed_precision="no", dataloader_num_workers=0, video_sample_size=64, image_sample_size=64,
                  token_sample_size=64, video_sample_n_frames=9, video_sample_stride=1, seed=1)
    precompute(PrecomputeConfig(train_data_meta=str(data / "metadata.json"), train_data_dir=str(data), **common),
               progress=False)
    train(TrainConfig(**common, output_dir=str(tmp_path / "out"), max_train_steps=200, checkpointing_steps=1000,
                      rank=64, network_alpha=64.0, target_name="proj_out,norm_out.linear,to_out.0,ff.2",
                      learning_rate=3e-3, report_to="none", caption_dropout=0.0, eval_samples=1.0, eval_steps=50))
    evals = [r["eval_loss"] for r in log_rows(tmp_path / "out") if "eval_loss" in r]
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["eval_samples_held_out"] == 1
    assert len(evals) == 5 and evals[-1] < 0.5 * evals[0], evals


def test_validation_geometry_defaults_round_as_precompute(tiny_model_inp):
    """Defaults from --video_sample_n_frames / --video_sample_size are rounded as precompute rounds
    them (50 -> 49 frames, 504 -> 496 px); a value that does not fit names the flag it came from."""
    from cogfun import sampling, validation

    def geo(**kw):
        cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_model_inp), validation_prompts="a cat", **kw)
        return validation.plan(cfg)[1]

    assert geo(video_sample_n_frames=50, video_sample_size=504) == sampling.Geometry(49, 496, 496)
    assert geo(video_sample_n_frames=50, validation_num_frames=9, validation_height=48,
               validation_width=64) == sampling.Geometry(9, 48, 64)
    with pytest.raises(ConfigError, match=r"^--validation_num_frames 10: must be 4k\+1"):
        geo(validation_num_frames=10)
    with pytest.raises(ConfigError, match=r"^--validation_width 40: must be a positive multiple of 16"):
        geo(validation_width=40)
    with pytest.raises(ConfigError, match=r"^--video_sample_size 8: must be a positive multiple of 16"):
        geo(video_sample_size=8)


def test_held_out_are_whole_source_files_fixed_by_seed():
    """--eval_samples counts source files: every view and every caption variant (`file#k`, same
    `source`) of a held-out file is held out, the rest trains; the choice is a function of the seed
    and the paths (the same for any reader of the same index)."""
    from cogfun.loader import CachedSamples, held_out

    rows = [("a.tar", "x.mp4", "kx_v0"), ("a.tar", "x.mp4", "kx_v1"), ("a.tar", "x.mp4", "kx2_v0"),  # x#2: a variant
            ("a.tar", "x.mp4", "kx2_v1"), ("a.tar", "y.mp4", "ky_v0"), ("a.tar", "y.mp4", "ky_v1"),
            ("b.tar", "z.png", "kz_v0"), ("b.tar", "w.mp4", "kw_v0"), ("b.tar", "w.mp4", "kw_v1"),
            ("b.tar", "v.mp4", "kv_v0")]
    positions = {"a.tar": 0, "b.tar": 0}
    index = {"shard": [], "position": [], "source": [], "key": []}
    for shard, source, key in rows:
        index["shard"].append(shard)
        index["position"].append(positions[shard])
        positions[shard] += 1
        index["source"].append(source)
        index["key"].append(key)
    dataset = CachedSamples("unused", {"shards": positions}, index=index)
    source_of = {dataset.global_index(sh, p): src for sh, p, src in zip(index["shard"], index["position"], index["source"])}
    seen = set()
    for seed in range(12):
        picks = {n: held_out(dataset, n, seed) for n in (1, 2, 3)}
        for n, held in picks.items():
            sources = {source_of[i] for i in held}
            assert len(sources) == n
            assert held == sorted(i for i, src in source_of.items() if src in sources)   # all their samples
        assert set(picks[1]) <= set(picks[2]) <= set(picks[3])   # growing N keeps the first files
        assert held_out(dataset, 0.4, seed) == picks[2]          # a fraction of the 5 files
        assert held_out(CachedSamples("unused", {"shards": positions}, index=index), 2, seed) == picks[2]
        seen.add(frozenset(source_of[i] for i in picks[1]))
    assert len(seen) > 2                                          # the seed decides
    assert held_out(dataset, 0, seed=42) == []
    with pytest.raises(ConfigError, match="leaving none to train on"):
        held_out(dataset, 5, seed=42)
    with pytest.raises(ConfigError, match="whole"):
        held_out(dataset, 2.5, seed=42)


def test_upstream_validation_epochs_tracker_and_transformer_path(setup, encoded_inputs, tmp_path, capsys):
    """CogVideoX-Fun's --validation_epochs (after epochs 0, n, 2n, ... besides the step rule),
    --tracker_project_name and --logging_dir (TensorBoard at <output_dir>/<logging_dir>/<project>),
    and --transformer_path (weights loaded over the folder's: here the folder's own, so 0 missing)."""
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import save_file

    from cogfun.stages.train import train

    out = tmp_path / "out"
    shutil.copytree(encoded_inputs, out / "validation")
    weights = tmp_path / "transformer.safetensors"
    save_file(CogVideoXTransformer3DModel.from_pretrained(setup["model"] / "transformer").state_dict(), str(weights))
    steps = 7
    train(TrainConfig(pretrained_model_name_or_path=str(setup["model"]), shard_dir=str(setup["shards"]),
                      output_dir=str(out), max_train_steps=steps, checkpointing_steps=100, mixed_precision="no", rank=4,
                      network_alpha=2.0, learning_rate=1e-2, dataloader_num_workers=0, report_to="tensorboard",
                      tracker_project_name="proj", logging_dir="tb", validation_prompts=str(setup["prompts"]),
                      validation_images=setup["image"], transformer_path=str(weights), validation_epochs=2,
                      **{**VALIDATION, "validation_steps": 100, "eval_steps": 100}, **DATA))
    assert f"--transformer_path {weights}: loaded; missing keys: 0, unexpected keys: 0" in capsys.readouterr().out
    per_epoch = json.loads((out / "run_config.json").read_text())["steps_per_epoch"]
    assert 1 <= per_epoch < steps
    expected = {(e + 1) * per_epoch for e in range(steps) if e % 2 == 0 and (e + 1) * per_epoch < steps} | {steps}
    assert {int(p.name.removeprefix("step-")) for p in (out / "samples").iterdir()} == expected
    assert len(expected) >= 3
    assert list((out / "tb" / "proj").glob("events.out.tfevents.*"))
