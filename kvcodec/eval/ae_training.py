"""Training the key/value autoencoders (`kvc train-ae`) on caches of the model they will serve."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from kvcodec.cache import KVCache
from kvcodec.codecs.autoencoder import TENSORS, AEConfig, CacheAutoencoder
from kvcodec.errors import InputError


def training_vectors(caches: Sequence[KVCache]) -> dict[str, torch.Tensor]:
    """Every key and every value vector of the caches, float32 [layers, vectors, head_dim] per kind."""
    first = caches[0]
    for cache in caches:
        if cache.num_layers != first.num_layers or any(
                a.key.shape[1] != b.key.shape[1] or a.key.shape[3] != b.key.shape[3] or a.value.shape[3] != b.value.shape[3]
                for a, b in zip(cache.layers, first.layers)):
            raise InputError("training caches must come from one model shape")
    return {name: torch.stack([torch.cat([getattr(c.layers[i], name).float().reshape(-1, getattr(c.layers[i], name).shape[3])
                                          for c in caches]) for i in range(first.num_layers)])
            for name in TENSORS}


def train(caches: Sequence[KVCache], latent_dim: int, hidden: int = 128, shared: bool = False, steps: int = 1500,
          batch: int = 256, lr: float = 3e-3, seed: int = 0, model: str = "", texts: dict | None = None,
          progress: Callable[[int, float], None] | None = None) -> CacheAutoencoder:
    """Autoencoders for the keys and values of `caches`, minimizing the squared error of
    normalized vectors. `progress(step, loss)` after every step."""
    if not caches:
        raise InputError("training needs at least one cache")
    if not 1 <= latent_dim:
        raise InputError(f"latent_dim must be positive, not {latent_dim}")
    data = training_vectors(caches)
    lay = caches[0].layers[0]
    config = AEConfig(layers=caches[0].num_layers, heads=lay.key.shape[1],
                      head_dim={"key": lay.key.shape[3], "value": lay.value.shape[3]}, latent_dim=latent_dim,
                      hidden=hidden, shared=shared, model=model, texts=dict(texts or {}))
    torch.manual_seed(seed)
    ae = CacheAutoencoder(config)
    for name, net in ae.nets.items():
        net.mean.copy_(data[name].mean(dim=1))
        net.std.copy_(data[name].std(dim=1).clamp_min(1e-6))
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        loss = 0.0
        for name, net in ae.nets.items():
            x = data[name]
            pick = torch.randint(0, x.shape[1], (x.shape[0], batch), generator=generator)
            xb = x.gather(1, pick[:, :, None].expand(-1, -1, x.shape[2]))
            error = (net.decode(net.encode(xb)) - xb) / net.std[:, None]
            loss = loss + error.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress(step + 1, float(loss) / len(TENSORS))
    return ae.eval()


@torch.no_grad()
def relative_error(ae: CacheAutoencoder, cache: KVCache) -> dict[str, float]:
    """Relative RMS reconstruction error of the keys and of the values, over all layers."""
    out = {}
    for name in TENSORS:
        num = den = 0.0
        for i, lay in enumerate(cache.layers):
            x = getattr(lay, name).float()
            num += float((ae.decode(name, i, ae.encode(name, i, x)) - x).pow(2).sum())
            den += float(x.pow(2).sum())
        out[name] = (num / den) ** 0.5 if den else 0.0
    return out
