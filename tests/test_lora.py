"""cogfun.lora: target resolution, the one (peft) LoRA path, diffusers and kohya round trips.

cogfun had a second, hand-written LoRA layer until the `--use_peft_lora` switch became a no-op;
the values pinned here (init, after 3 AdamW steps) are the ones both paths produced bitwise, so
files and numbers stay those users already have. diffusers-loaded vs trained model outputs agree
within atol 1e-5.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from cogfun.lora import (
    from_kohya,
    inject_lora,
    load_lora_file,
    lora_adapter_config,
    lora_state_dict,
    resolve_target_modules,
    save_kohya_lora,
    save_lora,
    to_kohya,
)

SEED_TARGETS = "to_q,to_k,to_v,ff.0,ff.2"  # the seed doc's --target_name
RANK, ALPHA = 4, 2.0  # alpha != rank: a lost alpha/rank scale changes the outputs


def tiny_transformer():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=33, out_channels=16, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=226)


def batch():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 2, 33, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 226, 32, generator=g),
                timestep=torch.tensor([500])), torch.randn(1, 2, 16, 8, 8, generator=g)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def train(model, steps=3, lr=1e-2):
    inputs, target = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(**inputs, return_dict=False)[0]
        torch.nn.functional.mse_loss(out, target).backward()
        opt.step()
        opt.zero_grad()
    return model


def lora_model(seed=1, **kw):
    model = tiny_transformer()
    names = inject_lora(model, rank=RANK, alpha=ALPHA, target_name=SEED_TARGETS, seed=seed, **kw)
    return model, names


# ----------------------------------------------------------------------------- resolution


def test_seed_targets_resolve_to_attention_and_feed_forward_linears():
    names = resolve_target_modules(tiny_transformer(), SEED_TARGETS)
    assert names == sorted(f"transformer_blocks.{i}.{m}" for i in range(2)
                           for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj", "ff.net.2"))


def test_literal_diffusers_names_and_spaces_work():
    model = tiny_transformer()
    assert resolve_target_modules(model, " ff.net.0.proj , ff.net.2,") == resolve_target_modules(model, "ff.0,ff.2")


def test_unknown_suffix_is_an_error_with_examples():
    with pytest.raises(ValueError) as e:
        resolve_target_modules(tiny_transformer(), "to_q,to_qq")
    msg = str(e.value)
    assert "'to_qq'" in msg and "transformer_blocks.0.attn1.to_q" in msg and "ff.0->ff.net.0.proj" in msg


@pytest.mark.parametrize("suffix, named", [("ff.net.0", ["GELU", "transformer_blocks.0.ff.net.0.proj"]),
                                           ("proj", ["patch_embed.proj", "Conv2d"]),
                                           ("attn1", ["Attention", "transformer_blocks.1.attn1.to_v"])])
def test_non_linear_match_is_an_error_naming_it(suffix, named):
    with pytest.raises(ValueError, match="not nn.Linear") as e:
        resolve_target_modules(tiny_transformer(), suffix)
    assert all(s in str(e.value) for s in named)


def test_empty_target_name_is_an_error():
    with pytest.raises(ValueError, match="no module-name suffixes"):
        resolve_target_modules(tiny_transformer(), " , ")


# ----------------------------------------------------------------------------- injection


def test_inject_freezes_base_and_adds_lora_to_exactly_the_targets():
    base_out = run(tiny_transformer(), batch()[0])
    model, names = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.default.weight" for m in names for ab in "AB"}
    assert type(model.transformer_blocks[0].attn1.to_q).__module__.startswith("peft.")
    sd = lora_state_dict(model)
    assert sorted(sd) == sorted(f"transformer.{m}.lora_{ab}.weight" for m in names for ab in "AB")
    assert sd["transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight"].shape == (RANK, 32)
    assert sd["transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight"].shape == (128, RANK)
    assert all(torch.count_nonzero(v) == 0 for k, v in sd.items() if "lora_B" in k)
    assert type(model).__name__ == "CogVideoXTransformer3DModel"
    assert torch.equal(run(model, batch()[0]), base_out)  # B = 0: no change at init
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, rank=RANK, alpha=ALPHA, target_name=SEED_TARGETS)


# The values cogfun's LoRA has always produced (both former paths): seed 1 init (bitwise: a seeded draw),
# then 3 AdamW steps (to float32 rounding: the CPU's kernels, chosen by its instruction set, differ in
# the last bits from machine to machine; the same machine gives the same bits).
PINNED_INIT_A = [0.1019539013504982, 0.108670674264431, -0.010245182551443577]   # block 0 to_q lora_A[0, :3]
PINNED_TRAINED_B = [0.02923668548464775, -0.02956751361489296, -0.02729899063706398]  # block 1 ff.net.2 lora_B[0, :3]
PINNED_OUTPUT_SUM, PINNED_ABS_SUM = 21.380956049077213, 201.65036146668717


def test_numbers_and_files_are_the_ones_cogfun_always_wrote(tmp_path):
    from peft import get_peft_model_state_dict

    model, names = lora_model()
    init = lora_state_dict(model)
    assert init["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"][0, :3].tolist() == PINNED_INIT_A
    # peft's own extractor agrees with ours (modulo diffusers' "transformer." prefix)
    reference = get_peft_model_state_dict(model)
    assert {f"transformer.{k}": v for k, v in reference.items()}.keys() == init.keys()
    assert all(torch.equal(v, init[f"transformer.{k}"]) for k, v in reference.items())

    train(model)
    sd = lora_state_dict(model)
    trained = sd["transformer.transformer_blocks.1.ff.net.2.lora_B.weight"][0, :3].tolist()
    assert trained == pytest.approx(PINNED_TRAINED_B, rel=1e-6, abs=0)
    assert float(run(model, batch()[0]).double().sum()) == pytest.approx(PINNED_OUTPUT_SUM, rel=1e-6)
    assert float(sum(v.double().abs().sum() for v in sd.values())) == pytest.approx(PINNED_ABS_SUM, rel=1e-6)
    assert all(torch.count_nonzero(v) for v in sd.values())  # lora_B trained away from 0

    # the file holds exactly these tensors and the adapter header, whatever --use_peft_lora said
    file = save_lora(tmp_path / "lora", sd, rank=RANK, alpha=ALPHA, target_modules=names,
                     extra_metadata={"cogfun.step": "3"})
    tensors, meta = load_lora_file(file)
    assert list(tensors) == list(sd) and all(torch.equal(tensors[k], sd[k]) for k in sd)
    assert json.loads(meta["lora_adapter_metadata"]) == {
        f"transformer.{k}": v for k, v in lora_adapter_config(rank=RANK, alpha=ALPHA, target_modules=names).items()}


def test_seed_is_reproducible_and_leaves_global_rng_alone():
    def seeded(seed, global_seed):
        model = tiny_transformer()
        torch.manual_seed(global_seed)  # a different global stream must not matter when seed= is given
        state = torch.get_rng_state()
        inject_lora(model, rank=RANK, alpha=ALPHA, target_name=SEED_TARGETS, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)  # forked RNG: nothing consumed from the global stream
        return lora_state_dict(model)

    a, b, c = seeded(7, 123), seeded(7, 999), seeded(8, 123)
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert not torch.equal(a[key], c[key])


def test_plain_module_and_wrapped_names():
    """A module without diffusers' add_adapter (peft's inject_adapter_in_model); checkpoint-wrapper
    segments in module names are stripped from the keys."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)))
    x = torch.randn(3, 8)
    assert inject_lora(model, rank=2, alpha=4.0, target_name="0.0,0.2", seed=0) == ["0.0", "0.2"]
    with torch.no_grad():
        model[0][2].lora_B["default"].weight.fill_(0.5)
    before = model(x)
    model[0] = checkpoint_wrapper(model[0])
    sd = lora_state_dict(model)
    assert list(sd) == ["transformer.0.0.lora_A.weight", "transformer.0.0.lora_B.weight",
                        "transformer.0.2.lora_A.weight", "transformer.0.2.lora_B.weight"]
    assert torch.equal(sd["transformer.0.2.lora_B.weight"], torch.full((8, 2), 0.5))
    assert torch.equal(model(x), before)


def test_fp32_lora_on_bf16_base():
    model = tiny_transformer().to(torch.bfloat16)
    inject_lora(model, rank=RANK, alpha=ALPHA, target_name="to_q,ff.2", seed=1, lora_dtype=torch.float32)
    sd = lora_state_dict(model)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert model.transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    # peft creates the adapter in the base dtype, then it is cast up: the init is the pinned one, bf16-rounded
    got = sd["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"][0, :3]
    assert torch.equal(got, torch.tensor(PINNED_INIT_A).to(torch.bfloat16).float())
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch()[0].items()}
    assert run(model, inputs).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- diffusers round trip


def test_diffusers_pipeline_loads_the_file_with_the_alpha_over_rank_scale(tmp_path):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tiny_transformer().save_pretrained(tmp_path / "model" / "transformer")
    model, names = lora_model()
    train(model)
    inputs = batch()[0]
    ours = run(model, inputs)
    run_config = json.dumps({"rank": RANK, "network_alpha": ALPHA})
    file = save_lora(tmp_path / "out", lora_state_dict(model), rank=RANK, alpha=ALPHA, target_modules=names,
                     extra_metadata={"cogfun.config": run_config, "cogfun.step": "3"})
    assert file == tmp_path / "out" / "pytorch_lora_weights.safetensors"

    def fresh_pipeline():
        transformer = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "model" / "transformer")
        return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                 scheduler=CogVideoXDDIMScheduler())

    pipe = fresh_pipeline()
    base = run(pipe.transformer, inputs)
    pipe.load_lora_weights(tmp_path / "out")  # a directory; a file path works the same
    loaded = run(pipe.transformer, inputs)
    assert torch.allclose(loaded, ours, atol=1e-5, rtol=0)
    assert (loaded - base).abs().max() > 1e-3  # the LoRA delta is really there
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.scaling == {"default_0": ALPHA / RANK}

    sd, meta = load_lora_file(file)
    assert meta["cogfun.config"] == run_config and meta["cogfun.step"] == "3"
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == ALPHA
    # same adapter header diffusers' own writer produces
    CogVideoXPipeline.save_lora_weights(
        tmp_path / "plain", transformer_lora_layers={k.removeprefix("transformer."): v for k, v in sd.items()},
        transformer_lora_adapter_metadata=lora_adapter_config(rank=RANK, alpha=ALPHA, target_modules=names))
    plain_sd, plain_meta = load_lora_file(tmp_path / "plain")
    assert plain_meta["lora_adapter_metadata"] == meta["lora_adapter_metadata"]
    assert list(plain_sd) == list(sd) and all(torch.equal(plain_sd[k], sd[k]) for k in sd)

    # negative control: without the header diffusers falls back to scale 1.0, and this test would see it
    CogVideoXPipeline.save_lora_weights(
        tmp_path / "no_meta", transformer_lora_layers={k.removeprefix("transformer."): v for k, v in sd.items()})
    pipe = fresh_pipeline()
    pipe.load_lora_weights(tmp_path / "no_meta" / "pytorch_lora_weights.safetensors")
    assert not torch.allclose(run(pipe.transformer, inputs), ours, atol=1e-4, rtol=0)


def test_save_lora_rejects_bad_input(tmp_path):
    model, names = lora_model()
    sd = lora_state_dict(model)
    with pytest.raises(ValueError, match="not a diffusers CogVideoX LoRA key"):
        save_lora(tmp_path, {k.removeprefix("transformer."): v for k, v in sd.items()}, rank=RANK, alpha=ALPHA,
                  target_modules=names)
    with pytest.raises(ValueError, match="rank 8"):
        save_lora(tmp_path, sd, rank=8, alpha=ALPHA, target_modules=names)
    with pytest.raises(ValueError, match="reserved"):
        save_lora(tmp_path, sd, rank=RANK, alpha=ALPHA, target_modules=names,
                  extra_metadata={"lora_adapter_metadata": "{}"})
    with pytest.raises(TypeError, match="str to str"):
        save_lora(tmp_path, sd, rank=RANK, alpha=ALPHA, target_modules=names, extra_metadata={"step": 3})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- kohya / ComfyUI variant


def test_kohya_file_round_trips_and_merges_with_alpha_over_rank(tmp_path):
    model, names = lora_model()
    train(model)
    sd = lora_state_dict(model)
    file = save_kohya_lora(tmp_path / "lora_kohya.safetensors", sd, rank=RANK, alpha=ALPHA,
                           extra_metadata={"cogfun.step": "3"})
    kohya, meta = load_lora_file(file)
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert meta["cogfun.step"] == "3"
    stem = "lora_unet__transformer_blocks_0_attn1_to_q"  # CogVideoX-Fun LoRANetwork naming
    assert torch.equal(kohya[f"{stem}.lora_down.weight"], sd["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert torch.equal(kohya[f"{stem}.lora_up.weight"], sd["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"])
    assert kohya[f"{stem}.alpha"].shape == () and kohya[f"{stem}.alpha"].item() == ALPHA
    assert len(kohya) == 3 * len(names)

    back, rank, alpha = from_kohya(kohya, names)
    assert (rank, alpha) == (RANK, ALPHA)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    single = {k.replace("lora_unet__", "lora_unet_"): v for k, v in kohya.items()}  # kohya's single "_" too
    assert list(from_kohya(single, names)[0]) == list(sd)

    # merge the way CogVideoX-Fun's merge_lora (and ComfyUI) does: W += alpha / rank * up @ down
    merged = tiny_transformer()
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name in names:
            s = "lora_unet__" + name.replace(".", "_")
            up, down = kohya[f"{s}.lora_up.weight"], kohya[f"{s}.lora_down.weight"]
            modules[name].weight += kohya[f"{s}.alpha"].item() / up.shape[1] * up @ down
    inputs = batch()[0]
    assert torch.allclose(run(merged, inputs), run(model, inputs), atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="no module named like"):
        from_kohya(kohya, names[1:])


# ----------------------------------------------------------------------------- core ComfyUI variant

# Core ComfyUI's CogVideoX (comfy/ldm/cogvideo/model.py, read 2026-12), restated for these tests: the
# Linear layers of its transformer, by its own names, with their weight shapes [out, in] for a config,
# and the diffusers module each one is loaded from (its checkpoint conversion).
def comfy_cogvideox_linears(cfg) -> dict[str, tuple[tuple[int, int], str]]:
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    inner = 4 * dim
    layout = {"patch_embed.text_proj": ((dim, cfg.text_embed_dim), "patch_embed.text_proj"),
              "time_embedding_linear_1": ((cfg.time_embed_dim, dim), "time_embedding.linear_1"),
              "time_embedding_linear_2": ((cfg.time_embed_dim, cfg.time_embed_dim), "time_embedding.linear_2"),
              "norm_out.linear": ((2 * dim, cfg.time_embed_dim), "norm_out.linear"),
              "proj_out": ((cfg.patch_size ** 2 * (cfg.patch_size_t or 1) * cfg.out_channels, dim), "proj_out")}
    for n in range(cfg.num_layers):
        d = f"transformer_blocks.{n}."
        layout.update({
            f"blocks.{n}.q": ((dim, dim), d + "attn1.to_q"), f"blocks.{n}.k": ((dim, dim), d + "attn1.to_k"),
            f"blocks.{n}.v": ((dim, dim), d + "attn1.to_v"), f"blocks.{n}.attn_out": ((dim, dim), d + "attn1.to_out.0"),
            f"blocks.{n}.norm1.linear": ((6 * dim, cfg.time_embed_dim), d + "norm1.linear"),
            f"blocks.{n}.norm2.linear": ((6 * dim, cfg.time_embed_dim), d + "norm2.linear"),
            f"blocks.{n}.ff_proj": ((inner, dim), d + "ff.net.0.proj"), f"blocks.{n}.ff_out": ((dim, inner), d + "ff.net.2")})
    return layout


def comfy_load_lora(lora: dict, model_modules: list[str]) -> tuple[dict, list[str]]:
    """ComfyUI's LoRA rules as read in comfy/lora.py: a model weight `diffusion_model.<m>.weight`
    takes the LoRA prefixes `diffusion_model.<m>` and `lora_unet_<m with . -> _>`; a prefix x loads
    up = x.lora_up.weight | x.lora_B.weight, down = x.lora_down.weight | x.lora_A.weight and
    scale = x.alpha / rank (rank = down's rows), 1.0 without x.alpha. Returns ({module: (up, down,
    scale)}, the keys it did not load: ComfyUI only logs a warning for those)."""
    key_map = {}
    for m in model_modules:
        key_map[f"diffusion_model.{m}"] = m
        key_map["lora_unet_" + m.replace(".", "_")] = m
    patches, loaded = {}, set()
    for x, module in key_map.items():
        for up_name, down_name in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
                                   (f"{x}.lora_B.weight", f"{x}.lora_A.weight")):
            if up_name in lora:
                down = lora[down_name]
                alpha = lora.get(f"{x}.alpha")
                scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
                patches[module] = (lora[up_name], down, scale)
                loaded |= {up_name, down_name} | ({f"{x}.alpha"} if alpha is not None else set())
                break
    return patches, sorted(set(lora) - loaded)


def test_comfyui_file_loads_every_module_in_core_comfyui_at_the_trained_scale(tmp_path):
    from cogfun.lora import COMFY_WEIGHT_NAME, save_comfyui_lora

    model = tiny_transformer()
    every_linear = ",".join(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    names = inject_lora(model, rank=RANK, alpha=ALPHA, target_name=every_linear, seed=1)
    train(model)
    sd = lora_state_dict(model)
    file = save_comfyui_lora(tmp_path / COMFY_WEIGHT_NAME, sd, rank=RANK, alpha=ALPHA)
    comfy, meta = load_lora_file(file)
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)

    layout = comfy_cogvideox_linears(model.config)
    patches, not_loaded = comfy_load_lora(comfy, list(layout))
    assert not_loaded == []                                   # every key lands on a module of ComfyUI's model
    assert len(patches) == len(names) == len(layout)          # ... and every LoRA module of ours does
    for module, (up, down, scale) in patches.items():
        assert (up.shape[0], down.shape[1]) == layout[module][0], module
        assert scale == ALPHA / RANK, module                  # the trained scale, not ComfyUI's 1.0 default

    # ComfyUI's model with the patches applied (W += strength * scale * up @ down, strength 1), loaded back
    # into diffusers' class by the same correspondence, computes what the trained model computes
    merged = tiny_transformer()
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for module, (up, down, scale) in patches.items():
            modules[layout[module][1]].weight += scale * up @ down
    inputs = batch()[0]
    assert torch.allclose(run(merged, inputs), run(model, inputs), atol=1e-5, rtol=0)
    # the CogVideoX-Fun/kohya file (lora_unet__transformer_blocks_...) loads nothing in core ComfyUI
    kohya = to_kohya(sd, rank=RANK, alpha=ALPHA)
    assert comfy_load_lora(kohya, list(layout))[0] == {}

    # and back: `cogfun sample --lora` takes the ComfyUI file too, at the same scale
    from cogfun.lora import from_comfyui
    from cogfun.sampling import load_lora

    back, rank, alpha = from_comfyui(comfy)
    assert (rank, alpha) == (RANK, ALPHA) and list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    sampled = tiny_transformer()
    assert load_lora(sampled, file)["format"] == "comfyui"
    assert torch.allclose(run(sampled, inputs), run(model, inputs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a key of core ComfyUI's CogVideoX LoRA layout"):
        from_comfyui({"diffusion_model.blocks.0.norm_q.lora_A.weight": torch.zeros(4, 16)})


def test_comfyui_names_of_every_diffusers_linear_and_a_clear_error_otherwise():
    from diffusers import CogVideoXTransformer3DModel

    from cogfun.lora import comfy_module_name

    v15 = CogVideoXTransformer3DModel(  # CogVideoX 1.5 layout: patch_embed.proj is a Linear
        num_attention_heads=2, attention_head_dim=16, in_channels=33, out_channels=16, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        patch_size_t=2, max_text_seq_length=226)
    layout = comfy_cogvideox_linears(v15.config)
    layout["patch_embed.proj"] = ((32, 2 * 2 * 2 * 33), "patch_embed.proj")
    linears = {n: tuple(m.weight.shape) for n, m in v15.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {comfy_module_name(n): n for n in linears} == {k: d for k, (_, d) in layout.items()}
    assert all(linears[d] == shape for shape, d in layout.values())
    with pytest.raises(ValueError, match="core ComfyUI's CogVideoX model has no module"):
        comfy_module_name("transformer_blocks.0.attn1.norm_q")


def test_export_lora_converts_a_checkpoint_to_each_format(tmp_path):
    from click.testing import CliRunner

    from cogfun import cli
    from cogfun.lora import COMFY_WEIGHT_NAME, KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, export_lora, to_comfyui

    model, names = lora_model()
    train(model)
    sd = lora_state_dict(model)
    ckpt = tmp_path / "checkpoint-3"
    save_lora(ckpt, sd, rank=RANK, alpha=ALPHA, target_modules=names, extra_metadata={"cogfun_step": "3"})

    result = CliRunner().invoke(cli.main, ["export-lora", str(ckpt), "--format", "comfyui"])
    assert result.exit_code == 0, result.output
    assert f"comfyui LoRA written to {ckpt / COMFY_WEIGHT_NAME}" in result.output
    comfy, meta = load_lora_file(ckpt / COMFY_WEIGHT_NAME)
    expected = to_comfyui(sd, rank=RANK, alpha=ALPHA)
    assert list(comfy) == list(expected) and all(torch.equal(comfy[k], expected[k]) for k in comfy)
    assert meta["cogfun_step"] == "3"

    kohya_file = export_lora(ckpt / LORA_WEIGHT_NAME, "kohya")
    assert kohya_file == ckpt / KOHYA_WEIGHT_NAME
    assert from_kohya(load_lora_file(kohya_file)[0], names)[1:] == (RANK, ALPHA)
    copy = export_lora(ckpt, "diffusers", tmp_path / "elsewhere.safetensors")
    assert (tmp_path / "elsewhere.safetensors").read_bytes() == (ckpt / LORA_WEIGHT_NAME).read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o666 & ~_umask()

    bad = CliRunner().invoke(cli.main, ["export-lora", str(kohya_file), "--format", "comfyui"])
    assert bad.exit_code == 1 and "not a diffusers-format LoRA file cogfun wrote" in bad.output
    bad = CliRunner().invoke(cli.main, ["export-lora", str(tmp_path), "--format", "kohya"])
    assert bad.exit_code == 1 and "no diffusers-format LoRA file there" in bad.output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_lora_files_are_byte_identical_whatever_the_metadata_order(tmp_path):
    """safetensors keeps the header metadata in a hash map (another order every time); cogfun sorts it."""
    model, names = lora_model()
    sd = lora_state_dict(model)
    meta = {f"cogfun_{k}": str(i) for i, k in enumerate("zyxwvu")}
    meta["cogfun_prompt"] = 'un café — 東京\n"quoted"\t\x01 \\ /'   # escapes and UTF-8 keep their length
    for i in range(4):
        save_lora(tmp_path / f"d{i}.safetensors", sd, rank=RANK, alpha=ALPHA, target_modules=names, extra_metadata=meta)
        save_kohya_lora(tmp_path / f"k{i}.safetensors", sd, rank=RANK, alpha=ALPHA, extra_metadata=meta)
    for kind in "dk":
        files = {(tmp_path / f"{kind}{i}.safetensors").read_bytes() for i in range(4)}
        assert len(files) == 1, kind
        tensors, header = load_lora_file(tmp_path / f"{kind}0.safetensors")
        assert header["cogfun_z"] == "0" and len(tensors) == (3 if kind == "k" else 2) * len(names)
        assert header["cogfun_prompt"] == meta["cogfun_prompt"]
