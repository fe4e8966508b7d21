"""LoRA on the CogVideoX transformer: pick the layers, inject (peft), extract, save.

Flags (seed doc): `target_name` (comma-separated module-name suffixes), `rank` r, `network_alpha`
α (update scale α/r). LoRA is always peft's `LoraConfig` injected through diffusers'
`add_adapter`; `use_peft_lora` is accepted for CogVideoX-Fun's launch lines and changes nothing.
(cogfun once had a second, hand-written layer behind that flag, numerically identical to peft's;
it was removed, and the files and numbers are those it produced.)

- **Init.** With `seed=` the adapter weights are drawn from `torch.manual_seed(seed)` in a forked
  CPU RNG (peft: for every target, in `model.named_modules()` order, two `nn.Linear` inits, then
  `kaiming_uniform_(lora_A, a=sqrt(5))`, `zeros_(lora_B)`), created in the default dtype and
  cast to the base layer's, or to `lora_dtype=` (e.g. fp32 LoRA on a bf16 base).
- **Forward.** `base(x) + lora_B(lora_A(x.to(A.dtype))) * (α/r)`, cast back to the base output dtype.
- **File.** `lora_state_dict` reads the layers into diffusers' CogVideoX key format
  (`transformer.<module>.lora_A.weight` / `.lora_B.weight`); `save_lora` writes it with
  `CogVideoXPipeline.save_lora_weights`.

How diffusers (0.42) carries α: `save_lora_weights(..., transformer_lora_adapter_metadata=cfg)`
stores `json.dumps({"transformer.<k>": v for k, v in cfg.items()})` under the safetensors header
key `lora_adapter_metadata` (`LORA_ADAPTER_METADATA_KEY`). `load_lora_weights` reads it back,
strips the `transformer.` prefix and builds `LoraConfig(**cfg)`, so r, lora_alpha and
target_modules come from the file. Without that header diffusers infers r from the shapes and
uses lora_alpha = r, i.e. silently scale 1.0 instead of α/r.

Kohya/ComfyUI variant (`save_kohya_lora`): CogVideoX-Fun's own non-peft `LoRANetwork` names a
module `"lora_unet" + "." + "" + "." + <module path>` with dots → underscores, i.e.
`lora_unet__transformer_blocks_0_attn1_to_q` (double underscore: the root module's name is
empty), with `.lora_down.weight` (= lora_A), `.lora_up.weight` (= lora_B) and a scalar `.alpha`;
its `merge_lora` (used by its ComfyUI nodes) applies `W += alpha / rank * up @ down`. diffusers
0.42 has no CogVideoX converter for that format (`CogVideoXLoraLoaderMixin` loads only the
diffusers format); `from_kohya` maps it back.

Core ComfyUI variant (`save_comfyui_lora`): core ComfyUI runs CogVideoX with its own transformer
(`comfy/ldm/cogvideo/`), whose modules are named `blocks.N.{q,k,v,attn_out,ff_proj,ff_out}` (+
`norm1.linear`, ... see `COMFY_BLOCK_NAMES`); its LoRA loader matches a file's keys against those
names only (`diffusion_model.<module>` or `lora_unet_<module with underscores>`), so neither file above
loads there. This one uses `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` and a scalar
`.alpha` per module; ComfyUI applies `strength * alpha / rank * B @ A` (1.0 instead of alpha / rank
when `.alpha` is missing).

Every file is written with a sorted header (identical runs give identical bytes) and the user's
umask; `export_lora` converts a checkpoint's diffusers file to any of the three formats.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from cogfun.config import LORA_FORMATS, ConfigError
from cogfun.shards import save_tensors

#: CogVideoX-Fun users write the feed-forward layers as `ff.0` / `ff.2` (an `nn.Sequential`
#: view of the MLP); in diffusers' `FeedForward` they are `ff.net.0.proj` (the Linear inside the
#: GELU module) and `ff.net.2`. An alias is used only when the literal suffix matches nothing.
TARGET_ALIASES: dict[str, str] = {
    "ff.0": "ff.net.0.proj",
    "ff.2": "ff.net.2",
}

PREFIX = "transformer"  # diffusers' CogVideoXLoraLoaderMixin.transformer_name
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"  # the same LoRA for ComfyUI / CogVideoX-Fun
KOHYA_PREFIX = "lora_unet__"  # CogVideoX-Fun LoRANetwork naming, see module docstring

# Wrapper segments that FSDP1 / activation checkpointing / torch.compile insert into names.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def _clean_name(name: str) -> str:
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".")


# --------------------------------------------------------------------------- target resolution


def _split_targets(target_name: str) -> list[str]:
    suffixes = [s.strip() for s in target_name.split(",") if s.strip()]
    if not suffixes:
        raise ValueError(f"target_name={target_name!r}: no module-name suffixes given")
    return suffixes


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _short_suffix(name: str) -> str:
    """`a.b.to_q` -> `to_q`, `a.to_out.0` -> `to_out.0`: the shortest suffix worth suggesting."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def resolve_target_modules(model: nn.Module, target_name: str) -> list[str]:
    """Full names of the `nn.Linear` modules that `target_name` selects, sorted.

    `target_name` is comma-separated suffixes; a suffix matches a module whose qualified name
    equals it or ends with `.<suffix>`. `TARGET_ALIASES` translates CogVideoX-Fun spellings
    (`ff.0`, `ff.2`) when the literal suffix matches nothing. Raises `ValueError` when a suffix
    matches nothing (listing example Linear names) or matches a module that is not an
    `nn.Linear` (naming it and its Linear submodules): never a silent no-op.
    """
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    selected: set[str] = set()
    for suffix in _split_targets(target_name):
        hits = [n for n in modules if n and _matches(n, suffix)]
        used = suffix
        if not hits and suffix in TARGET_ALIASES:
            used = TARGET_ALIASES[suffix]
            hits = [n for n in modules if n and _matches(n, used)]
        if not hits:
            examples = sorted({_short_suffix(n) for n in linear_names})
            raise ValueError(
                f"target_name suffix {suffix!r} matches no module of {type(model).__name__}. "
                f"Linear modules are named like: {', '.join(linear_names[:8])}, ... "
                f"(suffixes: {', '.join(examples)}; aliases: "
                f"{', '.join(f'{k}->{v}' for k, v in TARGET_ALIASES.items())})")
        bad = [n for n in hits if not isinstance(modules[n], nn.Linear)]
        if bad:
            details = []
            for n in bad[:4]:
                inner = [x for x in linear_names if x.startswith(n + ".")]
                details.append(f"{n} ({type(modules[n]).__name__}"
                               + (f"; its Linear submodules: {', '.join(inner[:4])}" if inner else "") + ")")
            raise ValueError(
                f"target_name suffix {suffix!r}" + (f" (via alias {used!r})" if used != suffix else "")
                + f" matches {len(bad)} module(s) that are not nn.Linear: {'; '.join(details)}"
                + (" ..." if len(bad) > 4 else "") + ". LoRA applies to nn.Linear only: use a more specific suffix.")
        selected.update(hits)
    return sorted(selected)


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, nn.Module]]:
    """(clean module name, module, lora_A Linear, lora_B Linear) for every LoRA layer, in module order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            adapters = list(mod.lora_A.keys())
            if len(adapters) != 1:
                raise ValueError(f"{name}: expected exactly one peft LoRA adapter, found {adapters}")
            a = adapters[0]
            out.append((_clean_name(name), mod, mod.lora_A[a], mod.lora_B[a]))
    return out


# --------------------------------------------------------------------------- injection


def inject_lora(model: nn.Module, *, rank: int, alpha: float, target_name: str, seed: int | None = None,
                lora_dtype: torch.dtype | None = None) -> list[str]:
    """Freeze `model` and add LoRA (rank r, scale alpha/r) to the modules `target_name` selects.

    peft `LoraConfig(r, lora_alpha, target_modules=<full names>, init_lora_weights=True)` through
    diffusers' `model.add_adapter` (`peft.inject_adapter_in_model` for a module without it).
    `seed`: when given, the LoRA init draws from `torch.manual_seed(seed)` inside a forked CPU RNG
    (global RNG untouched); otherwise from the current CPU RNG. `lora_dtype`: cast the LoRA weights
    after injection (e.g. fp32 trainable weights on a bf16 base); default: the base layer's dtype.
    Returns the sorted full names of the adapted modules.
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if _lora_layers(model):
        raise ValueError("model already has LoRA layers; inject_lora expects a plain base model")
    targets = resolve_target_modules(model, target_name)
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        if hasattr(model, "add_adapter") and hasattr(model, "_hf_peft_config_loaded"):
            model.add_adapter(config)  # diffusers PeftAdapterMixin: keeps the diffusers class
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, model)
    layers = _lora_layers(model)
    got = sorted(n for n, *_ in layers)
    if got != sorted(_clean_name(t) for t in targets):
        raise RuntimeError(f"LoRA landed on {len(got)} modules, expected {len(targets)}: {sorted(set(got) ^ set(targets))[:6]}")
    for _, _, lora_a, lora_b in layers:
        if lora_dtype is not None:
            lora_a.to(lora_dtype)
            lora_b.to(lora_dtype)
        lora_a.weight.requires_grad_(True)
        lora_b.weight.requires_grad_(True)
    return targets


# --------------------------------------------------------------------------- extraction


def _to_cpu_full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    full_tensor = getattr(t, "full_tensor", None)  # DTensor (FSDP2): a collective, call on every rank
    if full_tensor is not None:
        t = full_tensor()
    return t.to("cpu", copy=True).contiguous()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights only, diffusers' CogVideoX format, sorted by key, on CPU (copies).

    Keys: `transformer.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. Pass the unwrapped model (DDP `.module`, `accelerator.unwrap_model`);
    FSDP1 / checkpoint-wrapper / torch.compile name segments are stripped, FSDP2 DTensors are
    gathered with `full_tensor()` (collective).
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers")
    sd = {}
    for name, _, lora_a, lora_b in layers:
        sd[f"{PREFIX}.{name}.lora_A.weight"] = _to_cpu_full(lora_a.weight)
        sd[f"{PREFIX}.{name}.lora_B.weight"] = _to_cpu_full(lora_b.weight)
    return dict(sorted(sd.items()))


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a `lora_state_dict`-format LoRA into the model's LoRA layers, in place (the inverse of
    `lora_state_dict`; resume uses it). The keys must be exactly the model's LoRA keys. FSDP2
    DTensor parameters take their local shard of the full tensor (every rank holds the file: no
    communication)."""
    layers = _lora_layers(model)
    params = {}
    for name, _, lora_a, lora_b in layers:
        params[f"{PREFIX}.{name}.lora_A.weight"] = lora_a.weight
        params[f"{PREFIX}.{name}.lora_B.weight"] = lora_b.weight
    if set(params) != set(state_dict):
        diff = sorted(set(params) ^ set(state_dict))
        raise ValueError(f"the LoRA file does not match the model's LoRA layers ({len(diff)} keys differ, "
                         f"e.g. {diff[:3]}): other --rank / --target_name than the run that wrote it?")
    with torch.no_grad():
        for key, param in params.items():
            src = state_dict[key]
            if hasattr(param, "device_mesh"):   # DTensor
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(param.dtype), param.device_mesh, param.placements,
                                        src_data_rank=None).to_local()
                param = param.to_local()
            if src.shape != param.shape:
                raise ValueError(f"{key}: shape {tuple(src.shape)} in the file, {tuple(param.shape)} in the model")
            param.copy_(src)


# --------------------------------------------------------------------------- saving / loading


def lora_adapter_config(*, rank: int, alpha: float, target_modules: list[str]) -> dict:
    """The peft `LoraConfig` kwargs diffusers rebuilds the adapter from (carried in the file).

    A handful of long-standing fields rather than the full `LoraConfig.to_dict()` (what diffusers'
    training scripts store): that dict holds every field of the writer's peft version, and an older
    peft's `LoraConfig(**kw)` raises on the ones it does not know. Everything left out is at its
    default on both sides.
    """
    return {
        "r": int(rank),
        "lora_alpha": float(alpha),
        "target_modules": sorted(_clean_name(t) for t in target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def _check_lora_sd(state_dict: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Validate diffusers-format keys; return them without the `transformer.` prefix."""
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(PREFIX + ".") or not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")):
            raise ValueError(f"{k}: not a diffusers CogVideoX LoRA key (transformer.<module>.lora_A|lora_B.weight)")
        if v.ndim != 2 or (v.shape[0] if k.endswith(".lora_A.weight") else v.shape[1]) != rank:
            raise ValueError(f"{k}: shape {tuple(v.shape)} does not have rank {rank}")
        out[k[len(PREFIX) + 1:]] = v
    if not out:
        raise ValueError("empty LoRA state dict")
    return out


def _check_extra(extra_metadata: dict[str, str] | None, reserved: Iterable[str]) -> dict[str, str]:
    extra = dict(extra_metadata or {})
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"extra_metadata must map str to str (safetensors header); got {k!r}: {type(v).__name__}")
        if k in reserved:
            raise ValueError(f"extra_metadata key {k!r} is reserved")
    return extra


def _lora_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / LORA_WEIGHT_NAME


def save_lora(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float,
              target_modules: list[str], extra_metadata: dict[str, str] | None = None) -> Path:
    """Write a LoRA file `CogVideoXPipeline.load_lora_weights(path)` loads with scale alpha/rank.

    `path`: a directory (→ `<dir>/pytorch_lora_weights.safetensors`) or a `*.safetensors` file.
    `state_dict`: `lora_state_dict(model)`. Written by `CogVideoXPipeline.save_lora_weights`; its
    `save_function` hook is used only to add `extra_metadata` (e.g. cogfun's run config JSON,
    step) to the header beside diffusers' `lora_adapter_metadata` and to write atomically
    (tmp + rename). Call it on the main process only. Returns the file path.
    """
    from diffusers import CogVideoXPipeline
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, _pack_dict_with_prefix

    layers = _check_lora_sd(state_dict, rank)
    config = lora_adapter_config(rank=rank, alpha=alpha, target_modules=target_modules)
    extra = _check_extra(extra_metadata, reserved=("format", LORA_ADAPTER_METADATA_KEY))
    file = _lora_file(path)

    def save_function(weights: dict[str, torch.Tensor], filename: str) -> None:
        # What diffusers' default save_function writes (LoraBaseMixin.write_lora_layers), plus `extra`:
        # a custom save_function replaces it, so the adapter metadata is written here in the same form.
        header = {"format": "pt",
                  LORA_ADAPTER_METADATA_KEY: json.dumps(_pack_dict_with_prefix(config, PREFIX), indent=2, sort_keys=True),
                  **extra}
        # atomic, with the user's umask (safetensors writes 0600) and a sorted header (the same bytes every run)
        save_tensors(weights, Path(filename), metadata=header)

    CogVideoXPipeline.save_lora_weights(
        save_directory=str(file.parent), transformer_lora_layers=layers, weight_name=file.name,
        save_function=save_function, safe_serialization=True, transformer_lora_adapter_metadata=config)
    if not file.is_file():  # diffusers only logs an error when the directory is an existing file
        raise FileNotFoundError(f"{file}: not written (is {file.parent} a file?)")
    return file


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header metadata) of a LoRA file or a directory holding
    `pytorch_lora_weights.safetensors`. safetensors only, never pickle. diffusers' adapter config
    is `json.loads(metadata["lora_adapter_metadata"])` (keys prefixed `transformer.`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = _lora_file(path)
    with safe_open(str(file), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
    return load_file(str(file), device="cpu"), metadata


# --------------------------------------------------------------------------- kohya / ComfyUI variant


def to_kohya(state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA → CogVideoX-Fun/kohya keys: `lora_unet__<module_with_underscores>`
    `.lora_down.weight` (= lora_A), `.lora_up.weight` (= lora_B), `.alpha` (0-dim float32)."""
    layers = _check_lora_sd(state_dict, rank)
    out: dict[str, torch.Tensor] = {}
    stems: dict[str, str] = {}
    for k, v in layers.items():
        module, kind = k[: -len(".lora_A.weight")], k[-len("lora_A.weight"):]
        stem = KOHYA_PREFIX + module.replace(".", "_")
        if stems.setdefault(stem, module) != module:
            raise ValueError(f"modules {stems[stem]!r} and {module!r} both map to the kohya name {stem!r}")
        out[f"{stem}.{'lora_down' if kind == 'lora_A.weight' else 'lora_up'}.weight"] = v
        out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return dict(sorted(out.items()))


def save_kohya_lora(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float,
                    extra_metadata: dict[str, str] | None = None) -> Path:
    """Write `to_kohya(state_dict)` to the `*.safetensors` file `path` (atomic), with kohya's
    `ss_network_dim` / `ss_network_alpha` header entries plus `extra_metadata`."""
    header = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(int(rank)),
              "ss_network_alpha": str(float(alpha))}
    return _save_with_header(path, "kohya", to_kohya(state_dict, rank=rank, alpha=alpha), header, extra_metadata)


def _save_with_header(path, what: str, tensors: dict, header: dict, extra_metadata: dict | None) -> Path:
    """A converted LoRA file (atomic, sorted header): `header` + `extra_metadata`, which may not
    override the header's own keys."""
    file = Path(path)
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: the {what} LoRA file must end in .safetensors")
    file.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, file, metadata={**header, **_check_extra(extra_metadata, reserved=tuple(header))})
    return file


def from_kohya(state_dict: dict[str, torch.Tensor], module_names: Iterable[str]) -> tuple[dict[str, torch.Tensor], int, float]:
    """kohya keys (`lora_unet__…` or `lora_unet_…`) → (diffusers-format state dict, rank, alpha).

    Underscored names are ambiguous (`transformer_blocks`, `to_q`), so the real module names are
    needed: e.g. `[n for n, _ in model.named_modules()]` or the adapter's target modules. Raises if
    a key maps to no module, or ranks / alphas differ between modules.
    """
    lookup: dict[str, str] = {}
    for name in module_names:
        u = name.replace(".", "_")
        if u in lookup and lookup[u] != name:
            raise ValueError(f"module names {lookup[u]!r} and {name!r} both map to {u!r}")
        lookup[u] = name
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for k, v in state_dict.items():
        stem, _, kind = k.partition(".")
        for p in (KOHYA_PREFIX, "lora_unet_"):
            if stem.startswith(p):
                stem = stem[len(p):]
                break
        else:
            raise ValueError(f"{k}: not a lora_unet_ key")
        if stem not in lookup:
            raise ValueError(f"{k}: no module named like {stem!r}")
        module = lookup[stem]
        if kind == "alpha":
            alphas.add(float(v.item()))
        elif kind == "lora_down.weight":
            out[f"{PREFIX}.{module}.lora_A.weight"] = v
            ranks.add(v.shape[0])
        elif kind == "lora_up.weight":
            out[f"{PREFIX}.{module}.lora_B.weight"] = v
            ranks.add(v.shape[1])
        else:
            raise ValueError(f"{k}: unknown kohya entry {kind!r}")
    if len(ranks) != 1 or len(alphas) > 1:
        raise ValueError(f"expected one rank and one alpha, got ranks {sorted(ranks)} alphas {sorted(alphas)}")
    rank = ranks.pop()
    alpha = alphas.pop() if alphas else float(rank)  # kohya: no alpha means alpha = rank (scale 1)
    return dict(sorted(out.items())), rank, alpha


# --------------------------------------------------------------------------- core ComfyUI variant

COMFY_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"  # the same LoRA for core ComfyUI's CogVideoX
COMFY_PREFIX = "diffusion_model."
#: diffusers' Linear names inside `transformer_blocks.<N>.` -> core ComfyUI's inside `blocks.<N>.`
#: (its own CogVideoX transformer, `comfy/ldm/cogvideo/model.py`, read 2026-12).
COMFY_BLOCK_NAMES: dict[str, str] = {
    "attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
    "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out", "norm1.linear": "norm1.linear", "norm2.linear": "norm2.linear",
}
#: ... and outside the blocks.
COMFY_TOP_NAMES: dict[str, str] = {
    "patch_embed.proj": "patch_embed.proj", "patch_embed.text_proj": "patch_embed.text_proj",
    "time_embedding.linear_1": "time_embedding_linear_1", "time_embedding.linear_2": "time_embedding_linear_2",
    "ofs_embedding.linear_1": "ofs_embedding_linear_1", "ofs_embedding.linear_2": "ofs_embedding_linear_2",
    "norm_out.linear": "norm_out.linear", "proj_out": "proj_out",
}
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def comfy_module_name(module: str) -> str:
    """diffusers' CogVideoX module name -> core ComfyUI's (`transformer_blocks.3.attn1.to_q` ->
    `blocks.3.q`). Raises ValueError for a module core ComfyUI's model does not have."""
    found = _BLOCK.fullmatch(module)
    name = (f"blocks.{found.group(1)}.{COMFY_BLOCK_NAMES[found.group(2)]}"
            if found and found.group(2) in COMFY_BLOCK_NAMES else COMFY_TOP_NAMES.get(module))
    if name is None:
        raise ValueError(f"{module}: core ComfyUI's CogVideoX model has no module for it (known: "
                         f"transformer_blocks.N.{{{', '.join(COMFY_BLOCK_NAMES)}}}, {', '.join(COMFY_TOP_NAMES)})")
    return name


def to_comfyui(state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA -> core ComfyUI's native CogVideoX keys:
    `diffusion_model.blocks.<N>.<q|k|v|attn_out|ff_proj|ff_out|...>.lora_A.weight` / `.lora_B.weight`
    and a 0-dim float32 `.alpha` per module (ComfyUI applies alpha / rank; without it, 1.0)."""
    layers = _check_lora_sd(state_dict, rank)
    out: dict[str, torch.Tensor] = {}
    for k, v in layers.items():
        module, kind = k[: -len(".lora_A.weight")], k[-len("lora_A.weight"):]
        stem = COMFY_PREFIX + comfy_module_name(module)
        out[f"{stem}.{kind}"] = v
        out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return dict(sorted(out.items()))


def save_comfyui_lora(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float,
                      extra_metadata: dict[str, str] | None = None) -> Path:
    """Write `to_comfyui(state_dict)` to the `*.safetensors` file `path` (atomic, sorted header)."""
    header = {"format": "pt", "ss_network_dim": str(int(rank)), "ss_network_alpha": str(float(alpha))}
    return _save_with_header(path, "ComfyUI", to_comfyui(state_dict, rank=rank, alpha=alpha), header, extra_metadata)


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, float]:
    """`to_comfyui`'s keys -> (diffusers-format state dict, rank, alpha). Raises for a key that is not
    one of core ComfyUI's CogVideoX modules, or when ranks / alphas differ between modules."""
    block_names = {v: k for k, v in COMFY_BLOCK_NAMES.items()}
    top_names = {v: k for k, v in COMFY_TOP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for k, v in state_dict.items():
        body = k.removeprefix(COMFY_PREFIX)
        kind = next((x for x in (".lora_A.weight", ".lora_B.weight", ".alpha") if body.endswith(x)), "")
        stem = body[: len(body) - len(kind)]
        found = re.fullmatch(r"blocks\.(\d+)\.(.+)", stem)
        module = (f"transformer_blocks.{found.group(1)}.{block_names[found.group(2)]}"
                  if found and found.group(2) in block_names else top_names.get(stem))
        if body == k or not kind or module is None:
            raise ValueError(f"{k}: not a key of core ComfyUI's CogVideoX LoRA layout "
                             f"({COMFY_PREFIX}blocks.N.q.lora_A.weight, ...)")
        if kind == ".alpha":
            alphas.add(float(v.item()))
        else:
            out[f"{PREFIX}.{module}{kind}"] = v
            ranks.add(v.shape[0] if kind == ".lora_A.weight" else v.shape[1])
    if len(ranks) != 1 or len(alphas) > 1:
        raise ValueError(f"expected one rank and one alpha, got ranks {sorted(ranks)} alphas {sorted(alphas)}")
    rank = ranks.pop()
    return dict(sorted(out.items())), rank, alphas.pop() if alphas else float(rank)


# --------------------------------------------------------------------------- all files of a LoRA, and export

#: format (`cogfun.config.LORA_FORMATS`) -> its file name in an output or checkpoint dir
EXPORT_FORMATS = dict(zip(LORA_FORMATS, (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, COMFY_WEIGHT_NAME)))


def save_lora_as(fmt: str, file: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, rank: int,
                 alpha: float, target_modules: list[str], extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the LoRA to `file` in format `fmt` (a key of `EXPORT_FORMATS`); `extra_metadata` goes
    into the file's header. Returns the file."""
    if fmt == "diffusers":
        return save_lora(file, state_dict, rank=rank, alpha=alpha, target_modules=target_modules,
                         extra_metadata=extra_metadata)
    if fmt == "kohya":
        return save_kohya_lora(file, state_dict, rank=rank, alpha=alpha, extra_metadata=extra_metadata)
    if fmt == "comfyui":
        return save_comfyui_lora(file, state_dict, rank=rank, alpha=alpha, extra_metadata=extra_metadata)
    raise ValueError(f"LoRA format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")


def export_lora(source: str | os.PathLike, fmt: str, output: str | os.PathLike | None = None) -> Path:
    """Convert a LoRA cogfun wrote to another format: `source` is a training output dir, a
    `checkpoint-<N>/` dir (also of a killed run) or a diffusers-format file; it is read from its
    diffusers file (rank, alpha and target modules from its header). `output`: the file to write
    (default: `EXPORT_FORMATS[fmt]` beside the source file). The header's cogfun entries (step, run
    config, shards' fingerprint) are carried over."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"LoRA format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    file = _lora_file(source)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no diffusers-format LoRA file there (give a training output dir, a "
                                f"checkpoint-<N>/ dir or a {LORA_WEIGHT_NAME} file)")
    tensors, metadata = load_lora_file(file)
    if LORA_ADAPTER_METADATA_KEY not in metadata:
        raise ConfigError(f"{file}: its header has no {LORA_ADAPTER_METADATA_KEY!r} (rank, alpha, target modules): "
                          f"not a diffusers-format LoRA file cogfun wrote. Give the training output dir or "
                          f"checkpoint-<N>/ dir (or its {LORA_WEIGHT_NAME})")
    config = {k.removeprefix(PREFIX + "."): v for k, v in json.loads(metadata[LORA_ADAPTER_METADATA_KEY]).items()}
    extra = {k: v for k, v in metadata.items() if k.startswith("cogfun")}
    target = Path(output) if output else file.parent / EXPORT_FORMATS[fmt]
    if target.resolve() == file.resolve():
        raise ConfigError(f"{target}: that is the source file; give another --output")
    return save_lora_as(fmt, target, tensors, rank=config["r"], alpha=config["lora_alpha"],
                        target_modules=config["target_modules"], extra_metadata=extra)
