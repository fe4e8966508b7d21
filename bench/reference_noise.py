"""Reference-video noise: how close the cached design comes to CogVideoX-Fun's fresh per-step noise.

CogVideoX-Fun V1.1 / V1.5 InP models (`add_noise_in_inpaint_model: true`) are trained on
conditioning latents E(masked clip + sigma * n) with sigma = exp(N(-3, 0.5)) and n ~ N(0, I) drawn
afresh every step (E = the VAE encoder's posterior mean, as cached). Sides, on the tiny V1.1-5b-InP
stand-in's real-architecture VAE and transformer (random weights), per clip and mask policy:

- `fresh (2nd set)`  N more fresh draws: the Monte-Carlo floor of every number below
- `cogfun`           what cogfun caches and trains on (cogfun.masks): m0 = E(masked) and the noise
                     response d = E(masked + sigma0 * n0) - m0 at sigma0 = exp(-3); a step feeds
                     m0 + s * sigma / sigma0 * d with fresh sigma and a fresh sign s = +-1
                     (2 cached latents per policy)
- `linear, 2 patterns`  the same with two seeded patterns, (s1 d1 + s2 d2) / sqrt(2) (3 per policy)
- `K noisy encodes`  K seeded encodes E(masked + sigma_k n_k), one drawn per step (K per policy)
- `clean`            no reference noise (what cogfun did before; 1 per policy)

Measured against N fresh draws, per latent element (mean over clips and policies):
bias = RMS(mean_side - mean_fresh) / RMS(std_fresh); spread = RMS(std_side) / RMS(std_fresh);
W2 = the 2-Wasserstein distance of per-element Gaussians / RMS(std_fresh) (0 = same distribution).
And what SGD sees: the LoRA gradient g of the velocity loss at fixed latents, noise and timestep:
its expectation's error |E_side g - E_fresh g| in % of |E_fresh g| and relative to the noise's own
effect |E_fresh g - g(clean)|, and its spread std_side(g) / std_fresh(g) (the augmentation the
noise gives, step to step). Linearity of the VAE in sigma:
|E(masked + sigma n0) - m0 - sigma / sigma0 * d| / |E(masked + sigma n0) - m0| at sigma's
5 / 50 / 95 % quantiles.
"""

from __future__ import annotations

import math

import common as C


def add_args(p):
    p.add_argument("--draws", type=int, default=None, help="fresh draws per clip and policy (64; quick 16)")
    p.add_argument("--precision", default="no,bf16", help="VAE compute dtypes to measure (no = fp32)")


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], add_args)
    import torch

    from cogfun import masks, models
    from cogfun.lora import inject_lora
    from cogfun.tiny import synthetic_frames

    n_draws = args.draws or (16 if args.quick else 64)
    n_clips, frames, size = (2, 9, 64) if args.quick else (4, 17, 64)
    policies = ["i2v", "first_last"]
    model = C.tiny_model(variant="5b-inp-v1.1")
    scheduler = models.load_scheduler(model)
    transformer = models.load_transformer(model, torch.float32)
    inject_lora(transformer, rank=4, alpha=4.0, target_name="to_q,to_k,to_v,ff.0,ff.2", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking LoRA (B != 0), so every LoRA weight has a gradient
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    params = [p for p in transformer.parameters() if p.requires_grad]
    text = torch.randn(1, 226, transformer.config.text_embed_dim, generator=gen)
    z = {0.05: -1.6449, 0.5: 0.0, 0.95: 1.6449}
    sigma_q = {q: math.exp(masks.REFERENCE_NOISE_LOG_MEAN + masks.REFERENCE_NOISE_LOG_STD * v) for q, v in z.items()}

    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    linearity: dict[str, dict[float, list[float]]] = {}
    for precision in args.precision.split(","):
        vae = models.load_vae(model, models.dtype_of(precision), torch.device("cpu"))
        scaling = float(vae.config.scaling_factor)

        def encode(px):
            out = []
            for i in range(0, px.shape[0], 8):
                out.append(models.encode_clips(vae, px[i:i + 8])[0].float())
            return torch.cat(out)

        stats: dict[str, dict[str, list[float]]] = {}
        lin: dict[float, list[float]] = {q: [] for q in sigma_q}
        for c in range(n_clips):
            pixels = torch.from_numpy(synthetic_frames(size, size, frames, seed=c)).permute(3, 0, 1, 2)[None]
            pixels = pixels.float() / 127.5 - 1.0
            clean_latent = encode(pixels)
            noise = torch.randn(clean_latent.shape, generator=gen)
            t = torch.tensor([int(torch.randint(50, 950, (1,), generator=gen))])
            x0 = clean_latent * scaling
            noisy = scheduler.add_noise(x0, noise, t)
            target = scheduler.get_velocity(x0, noise, t)
            f_lat = x0.shape[1]

            def grad(policy, tensors, noise_scale=None):
                cond = masks.conditioning(policy, tensors, 0, frames=frames, keep=f_lat, scaling=scaling,
                                          noise_scale=noise_scale)
                model_in = torch.cat([noisy, cond], dim=2)
                pred = transformer(hidden_states=model_in, encoder_hidden_states=text, timestep=t,
                                   return_dict=False)[0]
                g = torch.autograd.grad(torch.nn.functional.mse_loss(pred, target), params)
                return torch.cat([x.flatten() for x in g])

            for policy in policies:
                masked = masks.masked_clip(pixels, policy)
                m0 = encode(masked)
                resp = {}
                for k in range(2):  # the cached noise response of pattern k (k = 0: what cogfun stores)
                    resp[k] = masks.encode_conditioning(encode, pixels, [{policy: None}],
                                                        keys=[f"clip{c}-{k}"], seed=42, reference_noise=True)
                d0 = resp[0][f"{masks.NOISE_RESPONSE}.{policy}"]
                d1 = resp[1][f"{masks.NOISE_RESPONSE}.{policy}"]
                assert torch.equal(resp[0][f"{masks.MASKED}.{policy}"].float(), m0)

                def fresh_set():
                    sig = masks.draw_reference_sigma(n_draws, generator=gen)
                    px = masks.add_reference_noise(masked.expand(n_draws, *masked.shape[1:]).clone(), sig,
                                                   generator=gen)
                    return encode(px)

                fresh, fresh2 = fresh_set(), fresh_set()
                # the cached sides' own per-step draws (independent of the fresh sets')
                sig = masks.draw_reference_sigma(n_draws, generator=gen)
                signs = torch.randint(0, 2, (n_draws, 2), generator=gen).float() * 2 - 1
                scale1 = signs[:, 0] * sig / masks.REFERENCE_NOISE_SIGMA0
                scale2 = sig / masks.REFERENCE_NOISE_SIGMA0 / math.sqrt(2)
                sides = {
                    "fresh (2nd set)": ("draws", fresh2),
                    "cogfun (linear, 1 pattern +-)": ("linear", [(d0, scale1)]),
                    "linear, 2 patterns": ("linear", [(d0, signs[:, 0] * scale2), (d1, signs[:, 1] * scale2)]),
                }
                for k in (1, 2, 4):
                    sk = masks.draw_reference_sigma(k, generator=gen)
                    pk = masks.add_reference_noise(masked.expand(k, *masked.shape[1:]).clone(), sk, generator=gen)
                    sides[f"{k} noisy encode{'s' if k > 1 else ''}"] = ("draws", encode(pk))
                sides["clean (no reference noise)"] = ("draws", m0)

                # per-element distribution statistics
                mu_f, sd_f = fresh.mean(0), fresh.std(0, unbiased=False)
                rms_sd = sd_f.pow(2).mean().sqrt()
                # gradients
                base = {"latent_mean": clean_latent}
                g_fresh = torch.stack([grad(policy, {**base, f"{masks.MASKED}.{policy}": fresh[j:j + 1]})
                                       for j in range(n_draws)])
                g_clean = grad(policy, {**base, f"{masks.MASKED}.{policy}": m0})
                eg_f, sg_f = g_fresh.mean(0), g_fresh.std(0, unbiased=False).pow(2).sum().sqrt()
                effect = (eg_f - g_clean).norm()
                for name, (kind, data) in sides.items():
                    if kind == "draws":
                        vals = data
                        gs = torch.stack([grad(policy, {**base, f"{masks.MASKED}.{policy}": vals[j:j + 1]})
                                          for j in range(vals.shape[0])])
                    else:
                        vals = m0 + sum(s.view(-1, 1, 1, 1, 1) * d for d, s in data)
                        gs = []
                        for j in range(n_draws):
                            tensors = {**base, f"{masks.MASKED}.{policy}": m0,
                                       f"{masks.NOISE_RESPONSE}.{policy}": data[0][0]}
                            if len(data) == 1:
                                gs.append(grad(policy, tensors, noise_scale=float(data[0][1][j])))
                            else:
                                gs.append(grad(policy, {**tensors, f"{masks.MASKED}.{policy}": vals[j:j + 1]}))
                        gs = torch.stack(gs)
                    mu, sd = vals.mean(0), vals.std(0, unbiased=False)
                    row = stats.setdefault(name, {"bias": [], "spread": [], "w2": [], "gerr": [], "grel": [],
                                                  "gspread": [], "effect": []})
                    row["bias"].append(float((mu - mu_f).pow(2).mean().sqrt() / rms_sd))
                    row["spread"].append(float(sd.pow(2).mean().sqrt() / rms_sd))
                    row["w2"].append(float(((mu - mu_f).pow(2) + (sd - sd_f).pow(2)).mean().sqrt() / rms_sd))
                    row["gerr"].append(float((gs.mean(0) - eg_f).norm() / effect))
                    row["grel"].append(float(100 * (gs.mean(0) - eg_f).norm() / eg_f.norm()))
                    row["effect"].append(float(100 * rms_sd / m0.pow(2).mean().sqrt()))
                    row["gspread"].append(float(gs.std(0, unbiased=False).pow(2).sum().sqrt() / sg_f))
                # linearity of the encoder in sigma, pattern n0
                n0 = masks.noise_pattern(masked.shape[1:], 42, f"clip{c}-0", policy)[None]
                for q, s in sigma_q.items():
                    true = encode(masks.add_reference_noise(masked, s, noise=n0)) - m0
                    lin[q].append(float((true - s / masks.REFERENCE_NOISE_SIGMA0 * d0).norm() / true.norm()))
        results[precision] = stats
        linearity[precision] = lin

    cost = {"fresh (2nd set)": "1 encode per step", "cogfun (linear, 1 pattern +-)": "2", "linear, 2 patterns": "3",
            "1 noisy encode": "1", "2 noisy encodes": "2", "4 noisy encodes": "4", "clean (no reference noise)": "1"}
    for precision, stats in results.items():
        print(f"\nVAE {'fp32' if precision == 'no' else precision}: {n_clips} clips x {len(policies)} policies "
              f"({frames}x{size}x{size}), {n_draws} fresh draws each; mean (min-max) over clips and policies")
        rows = []
        for name, row in stats.items():
            rows.append([name, cost[name]] + [C.spread(row[k]) for k in ("bias", "spread", "w2", "grel", "gerr",
                                                                                  "gspread")])
        print(C.table(rows, ["side", "cached latents / policy", "bias", "spread", "W2", "E[grad] error %",
                             "E[grad] error / noise effect", "grad spread"]))
        print(f"the reference noise moves the conditioning latents by RMS(std_fresh) = "
              f"{C.spread(stats['clean (no reference noise)']['effect'])} % of RMS(m0)")
        print("linearity residual at sigma quantiles 5 / 50 / 95 %: "
              + ", ".join(f"{q:.0%} (sigma {sigma_q[q]:.3f}): {C.spread(v)}" for q, v in linearity[precision].items()))


if __name__ == "__main__":
    main()
