"""Every flag of CogVideoX-Fun's scripts/cogvideox_fun/train_lora.py is accepted by `cogfun train`.

UPSTREAM is the list of its 82 argparse flags (read from its parser, commit 804a425) with a value to
pass, and what cogfun does with each: "same" (a cogfun setting of that name and meaning), "real"
(implemented for CogVideoX-Fun's launch scripts), "alias" (another name of a cogfun setting), "warn"
(accepted; changes nothing, says why), "ignore" (accepted silently) or "refuse" (an error saying why
and what to use). Never "No such option".
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from cogfun import cli
from cogfun.config import TrainConfig, to_dict

FLAG = None   # a store_true flag
UPSTREAM = {
    "input_perturbation": ("0.1", "warn"), "pretrained_model_name_or_path": ("M", "same"), "revision": ("main", "refuse"),
    "variant": ("fp16", "refuse"), "train_data_dir": ("D", "same"), "train_data_meta": ("D/m.json", "same"),
    "max_train_samples": ("10", "warn"), "validation_prompts": ("a cat", "same"), "validation_paths": ("f.png", "alias"),
    "output_dir": ("O", "same"), "cache_dir": ("C", "warn"), "seed": ("3", "same"), "random_flip": (FLAG, "warn"),
    "use_came": (FLAG, "real"), "multi_stream": (FLAG, "warn"), "train_batch_size": ("2", "same"),
    "vae_mini_batch": ("2", "same"), "num_train_epochs": ("3", "same"), "max_train_steps": ("5", "same"),
    "gradient_accumulation_steps": ("2", "same"), "gradient_checkpointing": (FLAG, "same"),
    "learning_rate": ("0.001", "same"), "scale_lr": (FLAG, "real"), "lr_scheduler": ("cosine", "same"),
    "lr_warmup_steps": ("7", "same"), "use_8bit_adam": (FLAG, "real"), "allow_tf32": (FLAG, "real"),
    "use_ema": (FLAG, "warn"), "non_ema_revision": ("main", "warn"), "dataloader_num_workers": ("1", "same"),
    "adam_beta1": ("0.8", "same"), "adam_beta2": ("0.99", "same"), "adam_weight_decay": ("0.001", "same"),
    "adam_epsilon": ("1e-07", "same"), "max_grad_norm": ("0.5", "same"), "push_to_hub": (FLAG, "warn"),
    "hub_token": ("T", "warn"), "prediction_type": ("epsilon", "warn"), "hub_model_id": ("H", "warn"),
    "logging_dir": ("tb", "real"), "mixed_precision": ("fp16", "same"), "report_to": ("none", "same"),
    "local_rank": ("0", "ignore"), "checkpointing_steps": ("50", "same"), "checkpoints_total_limit": ("2", "same"),
    "resume_from_checkpoint": ("latest", "same"), "noise_offset": ("0.1", "warn"), "validation_epochs": ("2", "real"),
    "validation_steps": ("30", "same"), "tracker_project_name": ("proj", "real"), "rank": ("8", "same"),
    "network_alpha": ("4", "same"), "use_peft_lora": (FLAG, "same"), "train_text_encoder": (FLAG, "refuse"),
    "snr_loss": (FLAG, "warn"), "uniform_sampling": (FLAG, "real"), "enable_text_encoder_in_dataloader": (FLAG, "warn"),
    "enable_bucket": (FLAG, "same"), "random_ratio_crop": (FLAG, "real"), "random_frame_crop": (FLAG, "same"),
    "random_hw_adapt": (FLAG, "same"), "training_with_video_token_length": (FLAG, "same"),
    "auto_tile_batch_size": (FLAG, "real"), "motion_sub_loss": (FLAG, "real"), "motion_sub_loss_ratio": ("0.5", "real"),
    "keep_all_node_same_token_length": (FLAG, "real"), "train_sampling_steps": ("500", "real"),
    "token_sample_size": ("256", "same"), "video_sample_size": ("256", "same"), "image_sample_size": ("256", "same"),
    "video_sample_stride": ("2", "same"), "video_sample_n_frames": ("33", "same"), "video_repeat": ("2", "same"),
    "transformer_path": ("t.safetensors", "real"), "vae_path": ("v.safetensors", "refuse"), "save_state": (FLAG, "warn"),
    "tokenizer_max_length": ("128", "refuse"), "use_deepspeed": (FLAG, "warn"), "use_fsdp": (FLAG, "warn"),
    "low_vram": (FLAG, "same"), "train_mode": ("inpaint", "same"), "target_name": ("to_q,to_k", "same"),
}


@pytest.fixture
def captured(monkeypatch):
    """`cogfun train` up to its config: the stage itself is replaced by one that keeps the config."""
    import cogfun.pipelines.precompute_then_train as pipeline

    got = []
    monkeypatch.setattr(pipeline, "run", got.append)
    return got


def test_the_list_is_upstreams_82_flags():
    assert len(UPSTREAM) == 82
    counts = {}
    for _, kind in UPSTREAM.values():
        counts[kind] = counts.get(kind, 0) + 1
    # 43 were cogfun settings already; the 39 others are accepted now
    assert counts == {"same": 43, "real": 15, "alias": 1, "warn": 17, "ignore": 1, "refuse": 5}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_every_upstream_flag_is_accepted_with_its_meaning(name, captured):
    value, kind = UPSTREAM[name]
    args = ["train", f"--{name}"] + ([] if value is FLAG else [value])
    if name == "random_ratio_crop":
        args.append("--enable_bucket")
    result = CliRunner().invoke(cli.main, args)
    assert "No such option" not in result.output
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert name in fields, f"--{name} is not declared in cogfun/config.py"
    hidden = fields[name].metadata["hidden"]
    if kind == "refuse":
        assert result.exit_code == 1, result.output
        assert f"--{name} (CogVideoX-Fun's train_lora.py) has no meaning in cogfun: " in result.output
        assert fields[name].metadata["help"] in result.output   # why, and what to use
        assert hidden and not captured
        return
    assert result.exit_code == 0, (result.output, result.exception)
    cfg = captured[0]
    if kind == "warn":
        assert f"warning: --{name}: " in result.output and hidden
        assert name not in to_dict(cfg)                       # a run records what it used, not an ignored flag
    elif kind == "ignore":
        assert "warning" not in result.output and hidden and name not in to_dict(cfg)
    elif kind == "alias":
        assert cfg.validation_images == value and hidden and "warning" not in result.output
    else:   # same / real: the value reaches the setting, and --help shows it
        assert "warning" not in result.output and not hidden
        got = getattr(cfg, name)
        assert got is True if value is FLAG else (str(got) == value or float(got) == float(value)), (name, got)


def test_help_hides_what_only_warns_or_refuses_and_hints_are_right():
    out = CliRunner().invoke(cli.main, ["train", "--help"]).output
    assert "--transformer_path" in out and "--motion_sub_loss" in out and "--tracker_project_name" in out
    assert "--use_ema" not in out and "--vae_path" not in out and "--revision" not in out
    # the flag that used to be rejected with a wrong hint ("Did you mean '--target_name'?")
    bad = CliRunner().invoke(cli.main, ["train", "--tracker_projec", "x"])
    assert bad.exit_code == 2 and "--tracker_project_name" in bad.output and "--target_name" not in bad.output


def test_several_values_as_upstream_passes_them(captured):
    result = CliRunner().invoke(cli.main, ["train", "--validation_prompts", "a red fox", "a cat", "--seed", "3",
                                           "--validation_paths", "a.png", "b.png"])
    assert result.exit_code == 0, result.output
    cfg = captured[0]
    assert cfg.validation_prompts == "a red fox|a cat" and cfg.validation_images == "a.png|b.png" and cfg.seed == 3
    clash = CliRunner().invoke(cli.main, ["train", "--validation_paths", "a.png", "--validation_images", "b.png"])
    assert clash.exit_code == 1 and "another name of --validation_images" in clash.output


def test_refused_and_warned_flags_from_toml(tmp_path, captured):
    (tmp_path / "a.toml").write_text("use_ema = true\nseed = 5\n")
    result = CliRunner().invoke(cli.main, ["train", "--config", str(tmp_path / "a.toml")])
    assert result.exit_code == 0 and "warning: --use_ema" in result.output and captured[0].seed == 5
    (tmp_path / "b.toml").write_text("vae_path = 'v.safetensors'\n")
    result = CliRunner().invoke(cli.main, ["train", "--config", str(tmp_path / "b.toml")])
    assert result.exit_code == 1 and "--vae_path" in result.output and "precompute" in result.output


def test_timestep_range_is_discrete_samplings_slices():
    """CogVideoX-Fun's DiscreteSampling(uniform_sampling=True): G groups, G the largest divisor of the
    world size that divides the step count; otherwise every rank draws from [0, n)."""
    from types import SimpleNamespace

    from cogfun.config import ConfigError
    from cogfun.stages.train import timestep_range

    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    cfg = TrainConfig(uniform_sampling=True)
    assert [timestep_range(cfg, sched, r, 4) for r in range(4)] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert {timestep_range(cfg, sched, r, 3) for r in range(3)} == {(0, 1000)}          # 1000 % 3: one group
    assert [timestep_range(cfg, sched, r, 6) for r in range(6)] == [(0, 500)] * 3 + [(500, 1000)] * 3
    assert timestep_range(TrainConfig(train_sampling_steps=500), sched, 1, 4) == (0, 500)
    assert timestep_range(TrainConfig(), sched, 0, 1) == (0, 1000)
    with pytest.raises(ConfigError, match="train_sampling_steps"):
        timestep_range(TrainConfig(train_sampling_steps=2000), sched, 0, 1)


def test_motion_sub_loss_is_the_frame_difference_mse():
    from cogfun.stages.train import with_motion_loss

    target = torch.zeros(2, 4, 3, 2, 2)
    pred = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(2, 4, 3, 2, 2) * 0.5   # frame t off by 0.5 t
    loss = torch.nn.functional.mse_loss(pred, target)
    # frame differences are 0.5 everywhere: motion MSE 0.25
    assert with_motion_loss(loss, pred, target, 0.25).item() == pytest.approx(0.75 * loss.item() + 0.25 * 0.25)
    assert with_motion_loss(loss, pred[:, :2], target[:, :2], 0.25) is loss        # 2 latent frames: unchanged


def test_optimizers_need_their_packages():
    from cogfun.config import ConfigError
    from cogfun.stages.train import make_optimizer

    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer(TrainConfig(learning_rate=1e-3, scale_lr=True, gradient_accumulation_steps=2,
                                     train_batch_size=3), p, world=4)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 * 3 * 4)
    for flag, package in (("use_8bit_adam", "bitsandbytes"), ("use_came", "came_pytorch")):
        try:
            __import__(package)
        except ImportError:
            with pytest.raises(ConfigError, match=f"pip install {package}"):
                make_optimizer(TrainConfig(**{flag: True}), p, world=1)


def test_transformer_path_loads_weights_and_refuses_pickles(tiny_model_inp, tmp_path):
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import save_file

    from cogfun.models import ModelError, load_transformer_weights

    model = CogVideoXTransformer3DModel.from_pretrained(tiny_model_inp / "transformer")
    state = {k: v.clone() + 1.0 for k, v in model.state_dict().items() if k.startswith("proj_out")}
    save_file(state, str(tmp_path / "t.safetensors"))
    missing, unexpected = load_transformer_weights(model, tmp_path / "t.safetensors")
    assert not unexpected and len(missing) == len(model.state_dict()) - len(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ModelError, match="pickle"):
        load_transformer_weights(model, tmp_path / "t.bin")
    save_file({"something.else": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="none of its 1 tensors"):
        load_transformer_weights(model, tmp_path / "other.safetensors")


def test_auto_tile_repeats_small_batches_as_upstream():
    from cogfun.stages.train import auto_tile

    cfg = TrainConfig(training_with_video_token_length=True, auto_tile_batch_size=True, video_sample_n_frames=49,
                      token_sample_size=512)
    x = torch.arange(2.0).view(2, 1)

    def batch(frames, side):
        return {"tensors": {"latent_mean": x}, "metas": [{"frames": frames, "height": side, "width": side}] * 2,
                "batch_id": 0}

    # budget 49 x 512^2: <= 1/16 -> 4x, <= 1/4 -> 2x, else as is
    for (frames, side), factor in (((1, 256), 4), ((9, 512), 2), ((17, 512), 1), ((49, 512), 1), ((9, 256), 4), ((13, 256), 2)):
        out = auto_tile(cfg, batch(frames, side))
        assert out["tensors"]["latent_mean"].flatten().tolist() == [0.0, 1.0] * factor
        assert len(out["metas"]) == 2 * factor
    assert auto_tile(TrainConfig(auto_tile_batch_size=True), batch(1, 256))["tensors"]["latent_mean"].shape[0] == 2


def test_same_token_length_is_one_draw_for_all_ranks():
    from types import SimpleNamespace

    from cogfun.stages.train import same_token_length_frames

    cfg = TrainConfig(keep_all_node_same_token_length=True, video_sample_n_frames=49, token_sample_size=512)
    metas = [{"height": 512, "width": 512}]
    # s = 256, 384, 512 -> 9, 25, 49 pixel frames -> 3, 7, 13 latent frames; CogVideoX 1.5: 2, 6, 12
    for multiple, allowed in ((1, {3, 7, 13}), (2, {2, 6, 12})):
        family = SimpleNamespace(latent_multiple=multiple)
        got = set()
        for step in range(60):
            per_rank = {same_token_length_frames(cfg, {"metas": metas, "batch_id": step * 4 + r}, 0, 4, family)
                        for r in range(4)}
            assert len(per_rank) == 1                     # every rank of a micro-step: the same length
            got |= per_rank
        assert got == allowed
    assert same_token_length_frames(TrainConfig(), {"metas": metas, "batch_id": 0}, 0, 1, None) is None
