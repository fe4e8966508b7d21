"""What the transformer sees besides its input: the positions CogVideoX-Fun's own transformer class
gives every token, at every bucket, and the CogVideoX 1.5 padding of a 1-latent-frame input.

The released CogVideoX-Fun checkpoints were trained by CogVideoX-Fun's class (VideoX-Fun's
`videox_fun/models/cogvideox_transformer3d.py` with the RoPE of its `train_lora.py`), whose
positions differ from diffusers' `CogVideoXTransformer3DModel` away from the native 480 x 720:

- **sincos (2b models, `use_rotary_positional_embeddings: false`).** The patch embedding keeps the
  table diffusers builds for (frames', sample_height / patch, sample_width / patch) and *resizes* it
  to the input's grid, trilinear with `align_corners=False` (the frame axis keeps its length), then
  cuts it to the input's tokens. diffusers recomputes sin/cos at the input's grid instead (a 37-58 %
  relative difference of a tiny 2b model's whole forward at 512-based buckets).
- **RoPE, CogVideoX 1.0 (V1.1-5b).** The crop-region grid with numpy's
  `linspace(start, stop, n, endpoint=False)` spacing: position `start + (stop - start) * i / n`.
  diffusers' `get_3d_rotary_pos_embed` uses `torch.linspace(start, stop * (n - 1) / n, n)`, which is
  another grid whenever the crop starts above 0 (non-native aspect ratios).
- **RoPE, CogVideoX 1.5 (`patch_size_t`).** The "slice" grid: the same as diffusers'.
- **1.5, one latent frame** (an image): a zero latent frame is appended inside the transformer
  and the output cropped back to the real frame.

:class:`FunTransformer` is diffusers' class with these rules built in, what
`cogfun.models.load_transformer` returns: same parameters, same state-dict keys (the sincos table is
a non-persistent buffer, as in both classes), same config; callers (training, eval loss, validation,
`cogfun sample`, diffusers' pipelines) pass no positions and need no padding. An
`image_rotary_emb` a caller passes (diffusers' pipelines always pass theirs) is replaced by
:func:`rotary_tables` of the input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import CogVideoXPatchEmbed, get_1d_rotary_pos_embed, get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid


def _linspace_end_excluded(start: float, stop: float, n: int) -> np.ndarray:
    """numpy.linspace(start, stop, n, endpoint=False) in float32: what CogVideoX-Fun's grid uses."""
    return np.linspace(start, stop, n, endpoint=False, dtype=np.float32)


def rotary_tables(config, latent_frames: int, height: int, width: int, device=None):
    """(cos, sin) [latent_frames' * h * w, head_dim] of CogVideoX-Fun for a latent input of
    `latent_frames` x `height` x `width` (latent units, after any 1.5 padding); None for a model without RoPE.

    `config`: the transformer's config. CogVideoX 1.0: the crop-region grid of the model's sample
    size, spaced with `endpoint=False`; CogVideoX 1.5 (patch_size_t): diffusers' "slice" grid with
    max size sample_height / patch x sample_width / patch and ceil(frames / patch_size_t) temporal positions.
    """
    if not config.use_rotary_positional_embeddings:
        return None
    p, p_t = config.patch_size, config.patch_size_t
    gh, gw = height // p, width // p
    base_h, base_w = config.sample_height // p, config.sample_width // p
    dim = config.attention_head_dim
    if p_t:
        cos, sin = get_3d_rotary_pos_embed(embed_dim=dim, crops_coords=None, grid_size=(gh, gw),
                                           temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice",
                                           max_size=(base_h, base_w))
        return cos.to(device), sin.to(device)
    (top, left), (bottom, right) = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
    axes = {"t": (dim // 4, _linspace_end_excluded(0, latent_frames, latent_frames)),
            "h": (dim // 8 * 3, _linspace_end_excluded(top, bottom, gh)),
            "w": (dim // 8 * 3, _linspace_end_excluded(left, right, gw))}
    (t_cos, t_sin), (h_cos, h_sin), (w_cos, w_sin) = (get_1d_rotary_pos_embed(d, grid, use_real=True)
                                                      for d, grid in axes.values())

    def combine(t, h, w):  # [T, dt], [H, dh], [W, dw] -> [T * H * W, dt + dh + dw], t slowest
        shape = (latent_frames, gh, gw)
        return torch.cat([t[:, None, None].expand(*shape, -1), h[None, :, None].expand(*shape, -1),
                          w[None, None].expand(*shape, -1)], dim=-1).reshape(latent_frames * gh * gw, -1)

    return combine(t_cos, h_cos, w_cos).to(device), combine(t_sin, h_sin, w_sin).to(device)


class StretchedPatchEmbed(CogVideoXPatchEmbed):
    """diffusers' CogVideoX patch embedding with CogVideoX-Fun's sincos positions: the stored table
    (`pos_embedding`, built for the model's sample size) resized to the input's grid (trilinear,
    align_corners=False, frame axis unchanged) and cut to the input's tokens.

    Made by :func:`stretch_patch_embed` from a loaded one (the same object, so the same state dict). More latent frames than the table holds (the config's sample_frames) is an error,
    as it is in CogVideoX-Fun's class.
    """

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        embeds = super().forward(text_embeds, image_embeds)  # positions off (use_positional_embeddings False)
        frames, height, width = image_embeds.shape[1], image_embeds.shape[3], image_embeds.shape[4]
        table_frames = (self.sample_frames - 1) // self.temporal_compression_ratio + 1
        if frames > table_frames:
            raise ValueError(
                f"{frames} latent frames ({(frames - 1) * self.temporal_compression_ratio + 1} pixel frames): this "
                f"model's position table covers {table_frames} latent frames (transformer config sample_frames "
                f"{self.sample_frames}), as CogVideoX-Fun's transformer class does; use at most "
                f"{self.sample_frames} frames (--video_sample_n_frames / --num_frames)")
        p = self.patch_size
        grid = (self.sample_height // p, self.sample_width // p)
        table = self.pos_embedding[:, self.max_text_seq_length:].to(self.text_proj.weight.dtype)
        # the frame axis keeps its length, so its trilinear weights are exactly 1 and 0: resizing only
        # the frames the input has gives the same numbers as resizing the whole table and cutting it
        table = table.reshape(1, table_frames, *grid, self.embed_dim)[:, :frames].permute(0, 4, 1, 2, 3)
        table = F.interpolate(table, size=(frames, height // p, width // p), mode="trilinear", align_corners=False)
        table = table.permute(0, 2, 3, 4, 1).reshape(1, -1, self.embed_dim)
        text_len = text_embeds.shape[1]
        return torch.cat([embeds[:, :text_len], embeds[:, text_len:] + table.to(embeds.dtype)], dim=1)


def stretch_patch_embed(embed: CogVideoXPatchEmbed) -> StretchedPatchEmbed:
    """Make a loaded patch embedding a :class:`StretchedPatchEmbed` in place (the subclass adds only
    its forward: same object, parameters and buffer); a learned-position one (CogVideoX-5b-I2V) is refused."""
    if embed.use_learned_positional_embeddings:
        raise ValueError("use_learned_positional_embeddings: a CogVideoX image-to-video layout, not a "
                         "CogVideoX-Fun one; cogfun does not train it")
    embed.__class__ = StretchedPatchEmbed
    embed.use_positional_embeddings = False  # diffusers' recomputed table off; forward adds the stretched one
    # CogVideoX-Fun's class holds the table in float32, then in the model's dtype; diffusers' stays
    # float64 (270 MB for the real 2b models), whatever dtype the model is loaded in
    embed.pos_embedding = embed.pos_embedding.float().to(embed.text_proj.weight.dtype)
    return embed


def pad_frames(hidden_states: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """CogVideoX 1.5: a 1-latent-frame input [B, 1, C, h, w] gets zero frames up to patch_size_t (as
    CogVideoX-Fun's class pads an image); other frame counts must fill the temporal patches."""
    n = hidden_states.shape[1]
    if not patch_size_t or n % patch_size_t == 0:
        return hidden_states
    if n != 1:
        raise ValueError(f"{n} latent frames do not fill patches of {patch_size_t} frames (the shards' frame "
                         f"rule should have made them a multiple)")
    pad = hidden_states.new_zeros(hidden_states.shape[0], patch_size_t - 1, *hidden_states.shape[2:])
    return torch.cat([hidden_states, pad], dim=1)


class FunTransformer(CogVideoXTransformer3DModel):
    """diffusers' CogVideoXTransformer3DModel computing CogVideoX-Fun's positions itself (module doc).

    Load it with `from_pretrained` (a diffusers-layout transformer folder, unchanged); the forward
    takes diffusers' arguments and returns only the real frames.
    """

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if model.patch_embed.use_positional_embeddings:
            model.patch_embed = stretch_patch_embed(model.patch_embed)
        return model

    def forward(self, hidden_states, encoder_hidden_states, timestep, timestep_cond=None, ofs=None,
                image_rotary_emb=None, attention_kwargs=None, return_dict: bool = True):
        frames = hidden_states.shape[1]
        hidden_states = pad_frames(hidden_states, self.config.patch_size_t)
        padded_frames, _, height, width = hidden_states.shape[1:]
        rope = rotary_tables(self.config, padded_frames, height, width, hidden_states.device)
        out = super().forward(hidden_states, encoder_hidden_states, timestep, timestep_cond=timestep_cond, ofs=ofs,
                              image_rotary_emb=rope, attention_kwargs=attention_kwargs, return_dict=return_dict)
        if padded_frames == frames:
            return out
        if not return_dict:
            return (out[0][:, :frames],)
        out.sample = out.sample[:, :frames]
        return out
