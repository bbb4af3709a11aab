"""Measuring a `kvtc` profile on a model (transformers), from training texts only.

1. Prefill each text, recording every layer's cache and the energy of its queries per channel.
2. Per (layer, key/value): keys rotated back to before their rotary embedding, the channels'
   mean and covariance over all tokens, weighted per channel by the model's sensitivity (keys:
   the query energy a channel meets, as attention logits are q . k; values: the squared norm of
   the output projection's columns the channel feeds); the weighted covariance's principal axes
   give the transform.
3. Sensitivity per (layer, key/value): noise of a known variance added to every component of
   that tensor alone; the next-token divergence it causes on the continuation, per unit variance.
4. `kl_scale`: the real divergence of the profile's own codec at its default target over the
   one the sensitivities predict (quantization is not Gaussian noise, and tensors interact).
"""

from __future__ import annotations

import numpy as np
import torch

from kvcodec.cache import TENSORS, KVCache, LayerKV
from kvcodec.calibration import rope
from kvcodec.calibration.profile import Profile, Rope, Transform
from kvcodec.eval import attention, capture, models, texts
from kvcodec.eval.fidelity import continue_logits

NOISE = 0.05  # noise RMS per component, as a fraction of the tensor's mean component spread


def rope_of(model) -> list[Rope | None]:
    """Each layer's rotary embedding: (frequencies, scale) from the model's rotary module, per
    layer type where layers differ (Gemma-3's sliding and global layers)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rotary = model.model.rotary_emb
    out = []
    for i in range(config.num_hidden_layers):
        if hasattr(rotary, "inv_freq"):
            inv, scale = rotary.inv_freq, rotary.attention_scaling
        else:
            kind = config.layer_types[i]
            inv, scale = getattr(rotary, f"{kind}_inv_freq"), getattr(rotary, f"{kind}_attention_scaling")
        out.append(Rope(inv.detach().float().cpu().numpy(), float(scale)))
    return out


class QueryEnergy(attention.Hook):
    """Per layer, the summed squares of every query channel [query heads, head_dim] and a count."""

    def __init__(self):
        self.energy: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}

    def queries(self, layer, query):
        q = query.detach().double()
        self.energy[layer] = self.energy.get(layer, 0) + q.pow(2).sum((0, 2))
        self.count[layer] = self.count.get(layer, 0) + q.shape[0] * q.shape[2]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, n, D] -> [B * n, H * D] float64: every token's channels, heads together."""
    b, h, n, d = x.shape
    return x.double().permute(0, 2, 1, 3).reshape(b * n, h * d)


def _pre_rotary(lay: LayerKV, r: Rope | None, index: int) -> torch.Tensor:
    if r is None:
        return lay.key.double()
    return rope.unrotate(lay.key.double(), r.inv_freq, r.scale, lay.positions if lay.positions is not None
                         else torch.arange(lay.key.shape[2])[None])


def channel_weights(model, energy: QueryEnergy, layer: int, heads: int, head_dim: int, rotary: Rope | None):
    """(key weights, value weights) [heads * head_dim]: what an error in each channel costs."""
    attn = model.model.layers[layer].self_attn
    q = (energy.energy[layer] / energy.count[layer])  # [query heads, D]
    q_heads = q.shape[0]
    groups = q_heads // heads
    if rotary is not None:  # a rotating pair's energy is shared by both of its channels
        p = len(rotary.inv_freq)
        pair = (q[:, :p] + q[:, p:2 * p]) / 2
        q = q.clone()
        q[:, :p], q[:, p:2 * p] = pair, pair
    scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
    key = (q.reshape(heads, groups, head_dim).sum(1) * scaling ** 2).reshape(-1)
    w = attn.o_proj.weight.detach().double()  # [hidden, query heads * D]
    value = w.pow(2).sum(0).reshape(heads, groups, head_dim).sum(1).reshape(-1)
    return key, value


def weighted_transform(mean: torch.Tensor, cov: torch.Tensor, weight: torch.Tensor) -> Transform:
    """The principal axes of the covariance in channels scaled by sqrt(weight)."""
    root = weight.clamp_min(weight.mean() * 1e-6).sqrt()
    scaled = cov * root[:, None] * root[None, :]
    values, vectors = torch.linalg.eigh(scaled)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    encoder = vectors.T * root[None, :]  # component j = v_j . (sqrt(w) * (z - mean))
    decoder = vectors / root[:, None]
    return Transform(mean.float().numpy(), encoder.float().numpy(), decoder.float().numpy(),
                     values.sqrt().float().numpy(), 1.0)


def from_caches(caches: list[KVCache], ropes: list[Rope | None], model: str = "", weights: dict | None = None,
                sensitivity: dict | None = None) -> Profile:
    """A profile from caches alone: each tensor's statistics over their tokens, channel `weights`
    per (layer, key/value) (default 1) and `sensitivity` per (layer, key/value) (default 1). For
    models without a harness here, and for tests; `calibrate` measures both on a model."""
    first = caches[0].layers[0]
    heads, dims = first.key.shape[1], {"key": first.key.shape[3], "value": first.value.shape[3]}
    transforms = {}
    for i in range(len(caches[0].layers)):
        for tensor in TENSORS:
            z = torch.cat([_flat(_pre_rotary(c.layers[i], ropes[i], i) if tensor == "key" else c.layers[i].value)
                           for c in caches])
            mean = z.mean(0)
            cov = (z - mean).T @ (z - mean) / max(len(z), 1)
            w = (weights or {}).get((i, tensor), torch.ones(z.shape[1], dtype=torch.float64))
            t = weighted_transform(mean, cov, w)
            transforms[(i, tensor)] = Transform(t.mean, t.encoder, t.decoder, t.spread,
                                                float((sensitivity or {}).get((i, tensor), 1.0)))
    return Profile(model, heads, dims, tuple(ropes), transforms, {"from": "caches"})


def _kl(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> float:
    lp = logits.log_softmax(-1)
    return float((ref_logprobs.exp() * (ref_logprobs - lp)).sum(-1).mean())


@torch.no_grad()
def calibrate(model_name: str | None = None, tokens: int = 1024, continuation: int = 128, progress=None) -> Profile:
    """A profile of the development model `model_name` from the shipped training texts;
    `progress(percent)` is called as the work advances."""
    name = models.model_named(model_name).name
    lm, _ = capture.load_model(name)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    layers = config.num_hidden_layers
    ropes = rope_of(lm)
    energy = QueryEnergy()
    sums: dict = {}
    used, contexts = [], []
    for text_name, path in texts.training_texts().items():
        ids = capture.tokenize(path.read_text(encoding="utf-8"), None, name)[:, :tokens + continuation]
        prefix = ids.shape[1] - continuation
        with attention.hooked(lm, energy):
            out = lm(ids[:, :prefix], use_cache=True)
        cache = KVCache.from_hf(out.past_key_values)
        for i, lay in enumerate(cache.layers):
            for tensor, x in (("key", _pre_rotary(lay, ropes[i], i)), ("value", lay.value.double())):
                z = _flat(x)
                s = sums.setdefault((i, tensor), [0, 0, 0])
                s[0] += z.shape[0]
                s[1] = s[1] + z.sum(0)
                s[2] = s[2] + z.T @ z
        contexts.append((cache, ids, prefix))
        used.append({"text": text_name, "tokens": prefix})
        if progress:
            progress(10 * len(used) // len(texts.training_texts()))
    lay0 = contexts[0][0].layers[0]
    heads, dims = lay0.key.shape[1], {"key": lay0.key.shape[3], "value": lay0.value.shape[3]}
    transforms = {}
    for i in range(layers):
        key_w, value_w = channel_weights(lm, energy, i, heads, dims["key"], ropes[i])
        for tensor, weight in (("key", key_w), ("value", value_w)):
            n, total, outer = sums[(i, tensor)]
            mean = total / n
            cov = outer / n - mean[:, None] * mean[None, :]
            transforms[(i, tensor)] = weighted_transform(mean, cov, weight)
    profile = Profile(models.MODELS[name].title, heads, dims, tuple(ropes), transforms,
                      {"texts": used, "continuation": continuation})
    profile = measure_sensitivity(profile, contexts, name, progress)
    profile = measure_kl_scale(profile, contexts, name)
    if progress:
        progress(100)
    return profile


def _noisy(cache: KVCache, profile: Profile, layer: int, tensor: str, sigma: float, seed: int) -> KVCache:
    """`cache` with Gaussian noise of RMS `sigma` on every component of one tensor."""
    lay = cache.layers[layer]
    t = profile.transforms[(layer, tensor)]
    r = profile.ropes[layer] if tensor == "key" else None
    x = _pre_rotary(lay, r, layer) if tensor == "key" else lay.value.double()
    b, h, n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b * n, h * d, generator=g, dtype=torch.float64) * sigma @ torch.from_numpy(
        t.decoder.astype(np.float64)).T
    y = x + noise.reshape(b, n, h, d).permute(0, 2, 1, 3)
    if r is not None:
        y = rope.rotate(y, r.inv_freq, r.scale, lay.positions if lay.positions is not None
                        else torch.arange(n)[None])
    y = y.to(lay.key.dtype)
    layers = list(cache.layers)
    layers[layer] = LayerKV(y if tensor == "key" else lay.key, y if tensor == "value" else lay.value,
                            lay.positions, lay.window)
    return KVCache(layers, cache.token_ids, dict(cache.metadata), cache.length, cache.selection)


def measure_sensitivity(profile: Profile, contexts, model: str, progress=None) -> Profile:
    """Each tensor's divergence per unit noise variance, on the first calibration text."""
    cache, ids, prefix = contexts[0]
    ref = continue_logits(cache, ids[:, prefix:], prefix, model).log_softmax(-1)
    transforms = {}
    for k, ((layer, tensor), t) in enumerate(profile.transforms.items()):
        sigma = NOISE * float(np.sqrt(np.mean(t.spread.astype(np.float64) ** 2)))
        kl = _kl(ref, continue_logits(_noisy(cache, profile, layer, tensor, sigma, k), ids[:, prefix:], prefix, model))
        transforms[(layer, tensor)] = Transform(t.mean, t.encoder, t.decoder, t.spread, max(kl, 1e-12) / sigma ** 2)
        if progress:
            progress(10 + 80 * (k + 1) // len(profile.transforms))
    return Profile(profile.model, profile.heads, profile.head_dims, profile.ropes, transforms, profile.calibration)


def measure_kl_scale(profile: Profile, contexts, model: str, rounds: int = 2) -> Profile:
    """The profile with `kl_scale` set so that its codec at the default target gives about that
    divergence on the first calibration text (measured through a real encode and decode)."""
    import tempfile
    from pathlib import Path

    from kvcodec import api
    from kvcodec.codecs.kvtc import DEFAULT_TARGET_KL

    cache, ids, prefix = contexts[0]
    ref = continue_logits(cache, ids[:, prefix:], prefix, model).log_softmax(-1)
    scale = 1.0
    with tempfile.TemporaryDirectory() as folder:
        for k in range(rounds):
            profile = Profile(profile.model, profile.heads, profile.head_dims, profile.ropes, profile.transforms,
                              profile.calibration, scale)
            path = Path(folder) / f"profile{k}.safetensors"
            path.write_bytes(profile.to_bytes())
            restored = api.decode(api.encode(cache.to(dtype=torch.float16), "kvtc", profile=str(path)))
            kl = _kl(ref, continue_logits(restored, ids[:, prefix:], prefix, model))
            scale *= max(kl, 1e-9) / DEFAULT_TARGET_KL
    return Profile(profile.model, profile.heads, profile.head_dims, profile.ropes, profile.transforms,
                   profile.calibration, scale)
