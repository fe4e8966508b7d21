"""fp8 storage of the frozen transformer (diffusers' layerwise casting) and block offloading
(accelerate's offload hooks): exact numbers, the hooks really in place, runs that train, resume
exactly, load in diffusers and sample on a bf16 base; refusals name the flag."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cogfun import lowmem
from cogfun.config import ConfigError, PrecomputeConfig, TrainConfig

TARGETS = "to_q,to_k,to_v,ff.0,ff.2"
DATA = dict(video_sample_size=64, image_sample_size=64, token_sample_size=64, video_sample_n_frames=9,
            video_sample_stride=2, enable_bucket=True, train_mode="inpaint", mask_policies="i2v,first_last",
            num_views=2, seed=42)


def lora_model(dtype):
    """The tiny t2v transformer in `dtype` with an fp32 LoRA whose B is non-zero (a real update)."""
    from cogfun.lora import inject_lora
    from cogfun.tiny import build_tiny_components

    t = build_tiny_components("t2v")["transformer"].to(dtype)
    inject_lora(t, rank=4, alpha=4, target_name=TARGETS, seed=1, lora_dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return t.train()


def step(t, autocast: bool):
    """One forward + backward; (loss, the LoRA gradients)."""
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 2, 16, 8, 8, generator=gen), torch.randn(1, 226, 32, generator=gen)
    dtype = torch.bfloat16 if autocast else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = t(hidden_states=x.to(dtype), encoder_hidden_states=text.to(dtype), timestep=torch.tensor([500]),
                return_dict=False)[0]
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in t.parameters() if p.requires_grad]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fp8_storage_trains_as_bf16_with_fp8_rounded_weights(checkpointing):
    fp8 = lora_model(torch.bfloat16)
    bf16_bytes = lowmem.resident_bytes(fp8)
    assert lowmem.apply_base_weight_dtype(fp8, torch.float8_e4m3fn, torch.bfloat16)
    # the reference: a bf16 model holding exactly the weights the fp8 storage holds
    rounded = lora_model(torch.bfloat16)
    stored = {n: p for n, p in fp8.named_parameters()}
    with torch.no_grad():
        for n, p in rounded.named_parameters():
            p.copy_(stored[n].to(torch.bfloat16))
    if checkpointing:
        fp8.enable_gradient_checkpointing()
        rounded.enable_gradient_checkpointing()
    base = {n: p for n, p in fp8.named_parameters() if "base_layer" in n}
    assert {p.dtype for p in base.values()} == {torch.float8_e4m3fn}
    assert {p.dtype for p in fp8.parameters() if p.requires_grad} == {torch.float32}   # LoRA A/B stay fp32
    assert lowmem.resident_bytes(fp8) < 0.9 * bf16_bytes
    got, want = step(fp8, autocast=True), step(rounded, autocast=True)
    assert got[0] == want[0]
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in got[1])
    # between steps every cast layer is back in fp8 (no bf16 copy left behind by the backward pass)
    assert {p.dtype for n, p in fp8.named_parameters() if "base_layer" in n} == {torch.float8_e4m3fn}


@pytest.mark.parametrize("fp8,checkpointing", [(False, False), (True, True)])
def test_offloaded_blocks_train_identically_and_hold_no_weights(fp8, checkpointing):
    dtype = torch.bfloat16 if fp8 else torch.float32
    runs = []
    for offload in (0, 2):
        t = lora_model(dtype)
        if checkpointing:
            t.enable_gradient_checkpointing()
        if fp8:
            lowmem.apply_base_weight_dtype(t, torch.float8_e4m3fn, torch.bfloat16)
        lora = [p for p in t.parameters() if p.requires_grad]
        hooked = lowmem.offload_blocks(t, offload, "cpu")
        runs.append(step(t, autocast=fp8))
        step(t, autocast=fp8)   # a second step: the hooks reload what they dropped
        if offload:
            assert len(hooked) == 24 and "transformer_blocks.1.attn1.to_q.base_layer" in hooked
            assert not any("lora" in n for n in hooked)
            # the frozen weights of both blocks are in CPU copies, not in the module, after the backward pass
            held = [n for n, p in t.transformer_blocks.named_parameters() if not p.is_meta and "lora" not in n]
            assert held == []
            assert lowmem.offloaded_bytes(t) > 0 and all(a is b for a, b in zip(lora, [p for p in t.parameters()
                                                                                         if p.requires_grad]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_refusals_name_the_flag(tmp_path, monkeypatch, tiny_model_inp):
    with pytest.raises(ConfigError, match="--base_weight_dtype: not supported under FSDP"):
        lowmem.check_launch("float8_e4m3fn", 0, kind="fsdp", mixed_precision="bf16")
    with pytest.raises(ConfigError, match="--offload_blocks: not supported under FSDP"):
        lowmem.check_launch(None, 2, kind="fsdp", mixed_precision="bf16")
    with pytest.raises(ConfigError, match="--base_weight_dtype fp32: DeepSpeed casts"):
        lowmem.check_launch("fp32", 0, kind="deepspeed", mixed_precision="bf16")
    lowmem.check_launch("float8_e5m2", 3, kind="deepspeed", mixed_precision="bf16")   # fp8 survives DeepSpeed
    with pytest.raises(ConfigError, match="--offload_blocks -1"):
        lowmem.check_launch(None, -1, kind="single", mixed_precision="bf16")
    with pytest.raises(ConfigError, match="--offload_blocks 3: this transformer has 2 blocks"):
        lowmem.offload_blocks(lora_model(torch.float32), 3, "cpu")
    # train refuses under an FSDP launch before it sets anything up
    from cogfun.stages.train import train

    with pytest.raises(ConfigError, match="--offload_blocks 5: this transformer has 2 blocks"):
        train(TrainConfig(pretrained_model_name_or_path=str(tiny_model_inp), shard_dir=str(tmp_path), offload_blocks=5))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="--base_weight_dtype"):
        train(TrainConfig(pretrained_model_name_or_path=str(tiny_model_inp), shard_dir=str(tmp_path),
                          base_weight_dtype="float8_e4m3fn"))
    assert "without --gradient_checkpointing" in lowmem.memory_notes("float8_e4m3fn", 0, False)[0]
    assert lowmem.memory_notes("float8_e4m3fn", 4, True) == lowmem.memory_notes("bf16", 0, False) == []


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_inp, synthetic_data):
    from accelerate.state import AcceleratorState

    from cogfun.stages.precompute import precompute

    out = tmp_path_factory.mktemp("lowmem") / "shards"
    precompute(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model_inp), train_data_meta=str(synthetic_data),
                                train_data_dir=str(synthetic_data.parent), shard_dir=str(out), mixed_precision="no",
                                dataloader_num_workers=0, **DATA), progress=False)
    AcceleratorState._reset_state(True)
    return out


def train_run(model, shards, out, **kw):
    from accelerate.state import AcceleratorState, GradientState

    from cogfun.stages.train import train

    settings = dict(max_train_steps=4, checkpointing_steps=2, mixed_precision="bf16", gradient_checkpointing=True,
                    rank=4, network_alpha=2.0, learning_rate=1e-3, dataloader_num_workers=0, report_to="none",
                    random_frame_crop=True, **DATA)
    cfg = TrainConfig(pretrained_model_name_or_path=str(model), shard_dir=str(shards), output_dir=str(out),
                      **{**settings, **kw})
    try:
        return train(cfg)["losses"]
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_fp8_and_offload_runs_train_resume_exactly_and_the_lora_samples_on_a_bf16_base(tiny_model_inp, shards,
                                                                                          tmp_path, synthetic_data):
    from cogfun.stages.sample import sample
    from cogfun.config import SampleConfig

    bf16 = train_run(tiny_model_inp, shards, tmp_path / "bf16")
    fp8 = train_run(tiny_model_inp, shards, tmp_path / "fp8", base_weight_dtype="float8_e4m3fn")
    out = tmp_path / "fp8_offload"
    both = train_run(tiny_model_inp, shards, out, base_weight_dtype="float8_e4m3fn", offload_blocks=1)
    assert both == fp8                                   # offloading changes no number
    assert fp8 != bf16 and fp8 == pytest.approx(bf16, rel=2e-3)   # fp8-rounded base weights: close, not equal
    run = json.loads((out / "run_config.json").read_text())
    assert (run["base_weight_dtype"], run["compute_dtype"], run["offloaded_layers"]) == ("float8_e4m3fn", "bfloat16", 12)
    assert run["frozen_bytes_offloaded"] > 0
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["cogfun_base_weight_dtype"] == "float8_e4m3fn"
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {v.dtype for v in final.values()} == {torch.float32}
    # resume from step 2: steps 3-4 and the LoRA come out exactly the same; validation renders through
    # the same hooked transformer
    shutil.rmtree(out / "checkpoint-4")
    again = train_run(tiny_model_inp, shards, out, base_weight_dtype="float8_e4m3fn", offload_blocks=1,
                      resume_from_checkpoint="latest", validation_prompts="A white square slides to the right.",
                      validation_steps=4, validation_num_frames=9, validation_height=48, validation_width=64,
                      validation_num_inference_steps=2)
    assert again == both[2:]
    resumed = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    assert len(list((out / "samples" / "step-4").glob("*.mp4"))) == 1
    # the LoRA trained on an fp8 base, applied by diffusers to a bf16 base, and sampled (also with fp8 + offload)
    common = dict(pretrained_model_name_or_path=str(tiny_model_inp), prompt="A white square slides to the right.",
                  image=str(synthetic_data.parent / "images" / "landscape.jpg"), num_inference_steps=2,
                  num_frames=9, height=48, width=64, mixed_precision="bf16")
    videos = {}
    for name, kw in {"base": {}, "bf16": {"lora": str(out)},
                     "fp8": {"lora": str(out), "base_weight_dtype": "float8_e4m3fn", "offload_blocks": 2}}.items():
        path = tmp_path / f"{name}.mp4"
        assert sample(SampleConfig(output=str(path), **common, **kw)) == [path]
        videos[name] = read_frames(path)
    assert (videos["bf16"] - videos["base"]).abs().mean() > 0.5          # the LoRA changes the video
    # fp8-rounded base weights (and offloaded blocks): the same video up to a few levels of 255
    assert 0 < (videos["fp8"] - videos["bf16"]).abs().mean() < 4


def read_frames(path):
    import av

    with av.open(str(path)) as container:
        comment = json.loads(container.metadata["comment"])
        frames = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])
    assert comment["base_weight_dtype"] in ("bfloat16", "float8_e4m3fn")
    return frames.float()


@pytest.mark.parametrize("kind", ["ddp", "deepspeed"])
def test_fp8_and_offload_under_ddp_and_zero2_match_one_process(tiny_model_inp, shards, tmp_path, kind):
    """2 processes over gloo (DDP cannot broadcast float8 over gloo: cogfun.lowmem tells it to skip the
    frozen float8 weights) = 1 process with accumulation 2, fp32 compute so that ZeRO-2 keeps fp32 LoRA."""
    from test_train import LAUNCHES, losses, run_cli

    flags = dict(base_weight_dtype="float8_e4m3fn", offload_blocks=1, mixed_precision="no")
    ref = train_run(tiny_model_inp, shards, tmp_path / "ref", gradient_accumulation_steps=2,
                    **{**flags, "max_train_steps": 2})
    out = tmp_path / kind
    args = ["train", "--pretrained_model_name_or_path", str(tiny_model_inp), "--shard_dir", str(shards),
            "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2", "--train_mode", "inpaint",
            "--rank", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--dataloader_num_workers", "0",
            "--report_to", "none", "--seed", "42", "--random_frame_crop", "--gradient_checkpointing",
            "--mixed_precision", "no", "--base_weight_dtype", "float8_e4m3fn", "--offload_blocks", "1"]
    launch, env = LAUNCHES[kind]
    run_cli(args, launch=launch, env=env)
    assert losses(out) == pytest.approx(ref, rel=1e-5)
    run = json.loads((out / "run_config.json").read_text())
    assert (run["world_size"], run["base_weight_dtype"], run["offloaded_layers"]) == (2, "float8_e4m3fn", 12)


def test_memory_estimate_matches_a_real_step_and_inspect_buckets_prints_it(tiny_model_inp, shards, capsys):
    """The activation part of the estimate (meta tensors, one block scaled) against the tensors autograd
    really keeps in a CPU training forward of the whole tiny model (bf16 autocast)."""
    from cogfun.config import InspectConfig
    from cogfun.inspect import run
    from cogfun.lora import inject_lora
    from cogfun.models import load_transformer

    est = lowmem.estimate_training_memory(tiny_model_inp, [(9, 64, 64)], rank=4, alpha=2, target_name=TARGETS)
    peak = est["buckets"][0]["peak"]
    t = load_transformer(tiny_model_inp, torch.bfloat16)
    inject_lora(t, rank=4, alpha=2, target_name=TARGETS, seed=0, lora_dtype=torch.float32)
    held = [p.untyped_storage() for p in t.train().parameters()]
    weights = {s._cdata for s in held}
    saved = {}

    def pack(x):
        if x.untyped_storage()._cdata not in weights:
            saved[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda y: y), torch.autocast("cpu", dtype=torch.bfloat16):
        t(hidden_states=torch.randn(1, 3, 33, 8, 8).bfloat16(), encoder_hidden_states=torch.randn(1, 226, 32).bfloat16(),
          timestep=torch.tensor([500]), return_dict=False)
    activations = peak["bf16"]["no_checkpointing"] - est["frozen_weight_bytes"]["bf16"] - est["lora_state_bytes"]
    assert activations == pytest.approx(sum(saved.values()), rel=0.1)
    assert est["frozen_weight_bytes"]["fp8"] < est["frozen_weight_bytes"]["bf16"]
    # fp8 saves at the peak only with checkpointing (without, autograd keeps bf16 copies of the cast weights)
    assert peak["fp8"]["no_checkpointing"] > peak["bf16"]["no_checkpointing"]
    assert peak["fp8+offload"]["checkpointing"] < peak["fp8"]["checkpointing"] < peak["bf16"]["checkpointing"]
    report = run(InspectConfig(shard_dir=str(shards), pretrained_model_name_or_path=str(tiny_model_inp)))
    assert set(report["memory"]["buckets"]) == {b["name"] for b in report["buckets"]}
    assert "training memory per GPU (estimate" in capsys.readouterr().out
