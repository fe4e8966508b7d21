"""Fitting the frozen transformer in less GPU memory: fp8 storage of its weights, block offloading.

Both come from the libraries; cogfun only chooses, checks and records them.

**`--base_weight_dtype`** (`storage_dtype`, `apply_base_weight_dtype`): float8 storage is diffusers'
`ModelMixin.enable_layerwise_casting(storage_dtype, compute_dtype)`. Every `nn.Linear` / conv of the
transformer keeps its weight in the storage dtype; a forward hook casts the layer to the compute
dtype (`--mixed_precision`) just before it runs and back right after. diffusers leaves alone what its
skip list names (`patch_embed`, `pos_embed`, `norm`, `proj_in/out`: the embeddings, the norms, and the
AdaLN modulation Linears `norm1.linear` / `norm2.linear`, 14 % of a 5b's weights) and every peft
LoRA layer (`lora_A` / `lora_B` are on its skip list), so the LoRA weights stay fp32
(`apply_base_weight_dtype` checks it) and the optimizer state follows them. In training the hook is
correct for the backward pass: the Linear's autograd node keeps the compute-dtype copy it used (a
transposed view of it), so the gradient is exactly that of a compute-dtype model holding the
fp8-rounded weights (tests/test_lowmem.py). It also means that without `--gradient_checkpointing`
those copies live until the backward pass: the saving then holds between steps but not at the step's
peak (bench/lowmem.py measures both); with checkpointing only one block's copies exist at a time.
Other storage dtypes: equal to the compute dtype = no hooks (today's behaviour); a narrower one is
layerwise casting as above; fp32 under bf16/fp16 compute is the weights loaded in fp32 with
accelerate's autocast computing in the lower precision.

**`--offload_blocks N`** (`offload_blocks`): the frozen layers of the first N transformer blocks keep
their weights in CPU memory; accelerate's `AlignDevicesHook` (the hook of `accelerate.cpu_offload`)
loads a layer's weights to the GPU as new tensors right before it runs and points the layer back at
"meta" right after. LoRA layers are not hooked (their parameters must stay the optimizer's). Why not
diffusers' `enable_group_offload`: its hooks move weights by assigning `param.data` in place
(`ModuleGroup.onload_` / `offload_`) and act on forward calls only. Autograd keeps some parameters
themselves for the backward pass (LayerNorm's weight, e.g. `norm1.norm`, `attn1.norm_q`, `norm_out`):
offloading a group after its forward changes what those saved tensors hold, so the backward pass
computes with the offloaded tensors: CPU tensors in a GPU computation (not run here: no GPU) or, with
`offload_to_disk_path`, uninitialised memory (NaN gradients, measured on the CPU in bench/lowmem.py). Under gradient checkpointing the backward recompute of a
block stops early (torch's non-reentrant checkpoint ends the recompute once it has what it needs),
so the group's offload never runs and every block stays on the GPU after the backward pass.
accelerate's hook replaces the parameter instead of writing into it: what autograd saved stays valid
and is freed with the graph. Its hooks sit on single layers, and in a CogVideoX block the recompute's
early stop falls after the last layer, so every recomputed layer is offloaded again (the tests check
that no hooked layer holds weights after a training step, with and without checkpointing).
"""

from __future__ import annotations

from cogfun.config import ConfigError

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float8_e4m3fn": "float8_e4m3fn",
           "float8_e5m2": "float8_e5m2"}


def storage_dtype(base_weight_dtype: str | None, compute_dtype):
    """The torch dtype the frozen weights are stored in: `--base_weight_dtype`, default the compute dtype."""
    import torch

    if base_weight_dtype is None:
        return compute_dtype
    if base_weight_dtype not in _DTYPES:
        raise ConfigError(f"--base_weight_dtype {base_weight_dtype}: choose from {', '.join(_DTYPES)}")
    return getattr(torch, _DTYPES[base_weight_dtype])


def dtype_name(dtype) -> str:
    """`torch.float8_e4m3fn` -> `float8_e4m3fn` (what run configs and file headers record)."""
    return str(dtype).removeprefix("torch.")


def load_dtype(storage, compute):
    """The dtype to load the transformer in: fp32 storage under a lower compute dtype loads fp32
    (autocast computes), everything else loads in the compute dtype (casting hooks store it)."""
    import torch

    return storage if storage == torch.float32 else compute


def needs_casting(storage, compute) -> bool:
    import torch

    return storage != compute and storage != torch.float32


def check_launch(base_weight_dtype: str | None, offload: int, *, kind: str, mixed_precision: str,
                 blocks: int | None = None) -> None:
    """Refuse what a launch kind cannot do, naming the flag (call before loading anything); `blocks`:
    the transformer's block count (config.json's num_layers), when known."""
    import torch

    from cogfun.models import dtype_of

    if offload < 0:
        raise ConfigError(f"--offload_blocks {offload}: give a number of transformer blocks >= 0 (0 = off)")
    if blocks is not None and offload > blocks:
        raise ConfigError(f"--offload_blocks {offload}: this transformer has {blocks} blocks")
    compute = dtype_of(mixed_precision)
    storage = storage_dtype(base_weight_dtype, compute)
    if kind == "fsdp" and (base_weight_dtype is not None or offload):
        flags = " and ".join(f for f, on in (("--base_weight_dtype", base_weight_dtype is not None),
                                              ("--offload_blocks", bool(offload))) if on)
        raise ConfigError(f"{flags}: not supported under FSDP (FSDP shards and all-gathers the weights itself, "
                          f"in one dtype per wrapped block, which the casting and offload hooks would change "
                          f"under it). Use DeepSpeed ZeRO-2 or DDP, or FSDP's own --fsdp_offload_params.")
    if kind == "deepspeed" and storage != compute and storage not in (torch.float8_e4m3fn, torch.float8_e5m2) \
            and mixed_precision != "no":
        raise ConfigError(f"--base_weight_dtype {base_weight_dtype}: DeepSpeed casts every bf16/fp16/fp32 weight "
                          f"to its own precision ({mixed_precision}), so only float8 storage (float8_e4m3fn, "
                          f"float8_e5m2) or --mixed_precision's dtype can be used under it")


def memory_notes(base_weight_dtype: str | None, offload: int, checkpointing: bool) -> list[str]:
    """What to tell a user whose options save little at the step's peak."""
    if checkpointing or not ((base_weight_dtype or "").startswith("float8") or offload):
        return []
    flags = " and ".join(f for f, on in (("--base_weight_dtype " + str(base_weight_dtype),
                                          (base_weight_dtype or "").startswith("float8")),
                                         (f"--offload_blocks {offload}", bool(offload))) if on)
    return [f"note: {flags} without --gradient_checkpointing: autograd keeps a compute-dtype copy of most frozen "
            f"weights until the backward pass, so the step's peak memory drops little or rises (float8); add "
            f"--gradient_checkpointing (inspect-buckets --pretrained_model_name_or_path shows both)"]


def apply_base_weight_dtype(transformer, storage, compute) -> bool:
    """Store the frozen weights in `storage` with diffusers' layerwise casting (after LoRA is injected,
    so that its input-cast guard covers the LoRA layers). No-op when no casting is needed. Checks that
    no trainable parameter changed dtype. Returns whether hooks were installed."""
    if not needs_casting(storage, compute):
        return False
    before = {n: p.dtype for n, p in transformer.named_parameters() if p.requires_grad}
    transformer.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    changed = [n for n, p in transformer.named_parameters() if p.requires_grad and p.dtype != before[n]]
    if changed:
        raise RuntimeError(f"layerwise casting changed the dtype of trainable parameters {changed[:3]}: "
                           f"diffusers' skip list no longer covers the LoRA layers")
    # DDP broadcasts every parameter from rank 0 when it wraps the model, and gloo has no float8 type
    # ("Invalid scalar type"). These weights are frozen and read from the same file on every rank, and DDP
    # never reduces them: tell it to leave them alone (torch's own switch, read by DDP only).
    from torch.nn.parallel import DistributedDataParallel

    frozen8 = [n for n, p in transformer.named_parameters() if not p.requires_grad and p.dtype.itemsize == 1]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, frozen8)
    return True


def offload_blocks(transformer, n: int, device) -> list[str]:
    """Keep the frozen layers of the first `n` transformer blocks in CPU memory, each loaded to `device`
    only while it runs (accelerate `AlignDevicesHook`, one per layer with weights of its own, LoRA
    layers excluded); everything else is moved to `device`. Apply after `apply_base_weight_dtype` (the
    CPU copies are then the stored dtype) and after `accelerator.prepare` (DDP and DeepSpeed broadcast
    every parameter when they wrap the model). Returns the hooked module names."""
    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import set_module_tensor_to_device

    if n <= 0:
        return []
    blocks = transformer.transformer_blocks
    if n > len(blocks):
        raise ConfigError(f"--offload_blocks {n}: this transformer has {len(blocks)} blocks")
    device = torch.device(device)
    if device.type == "cpu":   # accelerate's MULTI_CPU device is "cpu:0": the hook's `Parameter(..).to("cpu:0")`
        device = torch.device("cpu")   # would copy into a plain tensor, not a Parameter
    hooked = []
    for i, block in enumerate(blocks[:n]):
        for name, module in block.named_modules():
            own = list(module.named_parameters(recurse=False))
            if not own or any(p.requires_grad for _, p in own):
                continue
            weights = {k: p.detach().to("cpu") for k, p in own}     # the copy that stays in CPU memory
            add_hook_to_module(module, AlignDevicesHook(execution_device=device, offload=True, weights_map=weights,
                                                        offload_buffers=False), append=True)
            hooked.append(f"transformer_blocks.{i}.{name}".rstrip("."))
    for module in transformer.modules():   # the rest lives on the device (already there after prepare)
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if not t.is_meta and t.device != device:
                set_module_tensor_to_device(module, name, device)
    return hooked


def resident_bytes(module, *, trainable: bool = False) -> int:
    """Bytes of the module's frozen (or, `trainable=True`, trainable) parameters held in memory (not its
    buffers: computed tables such as the 2b's position embedding); offloaded ("meta") parameters count
    0, their CPU copies are `offloaded_bytes`."""
    return sum(p.nbytes for p in module.parameters() if p.requires_grad == trainable and not p.is_meta)


def offloaded_bytes(transformer) -> int:
    """Bytes of the CPU copies that `offload_blocks` holds."""
    total = 0
    for module in transformer.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            weights = getattr(h, "weights_map", None) if getattr(h, "offload", False) else None
            total += sum(t.nbytes for t in (weights or {}).values())
    return total


# ------------------------------------------------------------------ what a training step will hold (inspect-buckets)

OPTION_NAMES = ("bf16", "fp8", "bf16+offload", "fp8+offload")


def _meta_transformer(config: dict, layers: int, fp8: bool, *, rank: int, alpha: float, target_name: str):
    """The transformer of `config` (diffusers kwargs) with `layers` blocks on the meta device (no
    memory), bf16, with LoRA as `cogfun train` injects it, but in bf16: what bf16 autocast computes it
    in (autocast does not reach meta tensors); fp8: diffusers' layerwise casting."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel

    from cogfun.lora import inject_lora

    with init_empty_weights():
        t = CogVideoXTransformer3DModel(**{**config, "num_layers": layers}).to(torch.bfloat16)
    inject_lora(t, rank=rank, alpha=alpha, target_name=target_name, lora_dtype=torch.bfloat16)
    if fp8:
        apply_base_weight_dtype(t, torch.float8_e4m3fn, torch.bfloat16)
    return t.train()


def _saved_bytes(t, latent_shape, text_dim: int) -> dict:
    """One training forward of `t` (meta) on a [1, *latent_shape] input: bytes autograd keeps for the
    backward (unique storages), split into inside the transformer blocks (`block`: per block) and
    outside (`rest`). The attention matrix a math attention kernel would save ([.., seq, seq]) is
    left out: on a GPU cogfun's attention (PyTorch SDPA: flash / memory-efficient) keeps only the
    output and a log-sum-exp per query and head, which are added. `block_weights_kept`: the bytes of
    the block's own weights autograd keeps (what an offloaded block must leave on the device until its
    backward pass)."""
    import torch

    seq = latent_shape[0] * latent_shape[2] * latent_shape[3] // t.config.patch_size ** 2 // (t.config.patch_size_t or 1) \
        + t.config.max_text_seq_length
    inside = [False]
    saved = {"block": {}, "rest": {}}
    # the weights' own storages (resident anyway: counted as weights), held so that no new storage reuses
    # their address while the casting hooks swap them
    held = [p.untyped_storage() for p in t.parameters()]
    params = {s._cdata for s in held}

    weights_kept: dict[int, int] = {}

    def pack(x):
        key = x.untyped_storage()._cdata
        if key in params:
            if inside[0]:
                weights_kept[key] = x.untyped_storage().nbytes()
        elif not (x.ndim >= 2 and x.shape[-1] == x.shape[-2] == seq):
            saved["block" if inside[0] else "rest"][key] = x.untyped_storage().nbytes()
        return x

    block = t.transformer_blocks[0]
    handles = [block.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
               block.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    # the input asks for a gradient, as every block's input but the first one's does in training
    x = torch.empty(1, *latent_shape, device="meta", dtype=torch.bfloat16, requires_grad=True)
    text = torch.empty(1, t.config.max_text_seq_length, text_dim, device="meta", dtype=torch.bfloat16)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda y: y):
            t(hidden_states=x, encoder_hidden_states=text, timestep=torch.zeros(1, dtype=torch.long, device="meta"),
              return_dict=False)
    finally:
        for h in handles:
            h.remove()
    lse = t.config.num_attention_heads * seq * 4   # fp32 log-sum-exp of the fused attention kernel
    return {"block": sum(saved["block"].values()) + lse, "rest": sum(saved["rest"].values()), "seq": seq,
            "block_weights_kept": sum(weights_kept.values())}


def estimate_training_memory(model, buckets: list[tuple[int, int, int]], *, rank: int, alpha: float,
                             target_name: str) -> dict:
    """Device bytes of a `cogfun train` step (batch 1, bf16 compute, AdamW) per bucket (frames,
    height, width) and option (`OPTION_NAMES`, every block offloaded), with and without gradient
    checkpointing, from the model's transformer/config.json alone (meta-device counting, nothing
    loaded). How:

    - weights: the frozen parameters of the transformer on the meta device with LoRA injected as
      `cogfun train` does, in bf16 and after diffusers' fp8 casting (exact; one block counted, the
      blocks are identical); LoRA fp32 x 4 (weights, gradients, AdamW's two moments);
    - activations: what autograd keeps for the backward pass in one training forward of a ONE-block
      copy of the model at the bucket's latent shape (saved-tensor hooks, unique storages; attention
      as a fused kernel keeps it, see `_saved_bytes`), scaled to the model's blocks. Without
      checkpointing: every block's share; with it: each block's inputs + one block recomputed;
    - fp8 without checkpointing: + the compute-dtype copies of the cast weights that autograd keeps
      (measured as the difference of the one-block counts); offload: the non-block weights resident,
      plus the block weights autograd keeps (counted per block on the meta forward) in every block
      without checkpointing, one whole block (being recomputed) with it.

    Not counted: the allocator's slack and the transient buffers of single ops (the largest is a
    feed-forward intermediate or an attention workspace), CUDA context (~0.5 GB) and the batch.
    """
    from cogfun.models import FUN_KEYS, read_component_config

    config = {k: v for k, v in read_component_config(model, "transformer").items()
              if not k.startswith("_") and k not in FUN_KEYS}
    one = {fp8: _meta_transformer(config, 1, fp8, rank=rank, alpha=alpha, target_name=target_name)
           for fp8 in (False, True)}   # the blocks are identical: one stands for all
    n = int(config.get("num_layers", 30))
    c = one[False].config

    def frozen(t, blocks: bool):
        return sum(p.nbytes for name, p in t.named_parameters() if not p.requires_grad
                   and name.startswith("transformer_blocks.") == blocks)

    rest = {"bf16": frozen(one[False], False), "fp8": frozen(one[True], False)}
    per_block = {"bf16": frozen(one[False], True), "fp8": frozen(one[True], True)}
    weights = {k: rest[k] + n * per_block[k] for k in rest}
    lora_state = 4 * 4 * n * sum(p.numel() for p in one[False].transformer_blocks.parameters() if p.requires_grad)
    inner = c.num_attention_heads * c.attention_head_dim
    text_dim, patch_t = c.text_embed_dim, c.patch_size_t or 1
    copies = None
    rows = []
    for frames, height, width in buckets:
        f_lat = (frames - 1) // 4 + 1
        f_lat += -f_lat % patch_t
        shape = (f_lat, c.in_channels, height // 8, width // 8)
        act = _saved_bytes(one[False], shape, text_dim)
        if copies is None:   # the compute-dtype copies of the cast weights one block keeps: no token dependence
            act8 = _saved_bytes(one[True], shape, text_dim)
            copies, kept_fp8 = max(0, act8["block"] - act["block"]), act8["block_weights_kept"]
        inputs = act["seq"] * inner * 2 + 2 * c.time_embed_dim * 2   # a checkpointed block's inputs (bf16)
        full_act, ckpt_act = n * act["block"] + act["rest"], n * inputs + act["rest"] + act["block"]
        est = {
            "bf16": (weights["bf16"] + full_act, weights["bf16"] + ckpt_act),
            "fp8": (weights["fp8"] + full_act + n * copies, weights["fp8"] + ckpt_act + copies),
            "bf16+offload": (rest["bf16"] + n * act["block_weights_kept"] + full_act,
                             rest["bf16"] + ckpt_act + per_block["bf16"]),
            "fp8+offload": (rest["fp8"] + n * (kept_fp8 + copies) + full_act,
                            rest["fp8"] + ckpt_act + per_block["fp8"] + copies),
        }
        rows.append({"frames": frames, "height": height, "width": width, "tokens": act["seq"],
                     "activations": full_act, "activations_checkpointed": ckpt_act,
                     "peak": {k: {"no_checkpointing": round(a + lora_state), "checkpointing": round(c + lora_state)}
                              for k, (a, c) in est.items()}})
    return {"frozen_weight_bytes": weights, "non_block_weight_bytes": rest, "lora_state_bytes": lora_state,
            "blocks": n, "buckets": rows}
