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


def test_refusals_name_the_flag(tmp_path, monkeypatch):
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
    from stages.train import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="--base_weight_dtype"):
        train(TrainConfig(pretrained_model_name_or_path=str(tmp_path), shard_dir=str(tmp_path),
                          base_weight_dtype="float8_e4m3fn"))
