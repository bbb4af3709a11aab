"""`KVCache`: the in-memory data model every codec and file layout converts to and from."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from kvcodec.dtypes import dtype_name
from kvcodec.errors import InputError

MAX_LAYERS = 4096  # layers a cache (and a file) may have
TENSORS = ("key", "value")  # the two tensors of a layer, in the order files and codecs use


@dataclass
class LayerKV:
    """One layer: key `[batch, heads, tokens, head_dim]`, value likewise (head_dim may differ).

    `positions` (int64, `[tokens]` or `[heads, tokens]`) are the original sequence positions of
    the kept tokens; None means 0..tokens-1.
    """

    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor | None = None


@dataclass
class KVCache:
    """A cache of all layers. A pruned cache (layers with `positions`) also records `length`,
    the sequence length it continues from (new tokens take positions from there on), and
    `selection`, the stage that chose its tokens ({"id", "name", "config"})."""

    layers: list[LayerKV]
    token_ids: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "legacy"
    length: int | None = None
    selection: dict | None = None

    def __post_init__(self):
        validate(self)

    # -- shape ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers for t in (lay.key, lay.value))

    def __iter__(self):
        return iter((lay.key, lay.value) for lay in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def next_position(self) -> int:
        """The position of the next token fed after this cache."""
        if self.length is not None:
            return self.length
        return max(_end(lay) for lay in self.layers)

    def to(self, device=None, dtype=None) -> "KVCache":
        layers = [LayerKV(lay.key.to(device=device, dtype=dtype), lay.value.to(device=device, dtype=dtype),
                          lay.positions) for lay in self.layers]
        return KVCache(layers, self.token_ids, dict(self.metadata), self.layout, self.length, self.selection)

    def equal(self, other: "KVCache") -> bool:
        """Bit-exact equality of every tensor, dtype included."""
        if len(self.layers) != len(other.layers):
            return False
        for a, b in zip(self.layers, other.layers):
            for x, y in ((a.key, b.key), (a.value, b.value)):
                if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.cpu(), y.cpu()):
                    return False
        return True

    # -- transformers --------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cache, metadata: dict[str, str] | None = None) -> "KVCache":
        """From a transformers `DynamicCache` (or the legacy tuple of (key, value) pairs)."""
        if hasattr(cache, "layers") and cache.layers and hasattr(cache.layers[0], "keys"):
            pairs = [(lay.keys, lay.values) for lay in cache.layers]
        elif hasattr(cache, "key_cache"):
            pairs = list(zip(cache.key_cache, cache.value_cache))
        elif isinstance(cache, (tuple, list)):
            pairs = list(cache)
        else:
            raise InputError(f"cannot read a cache from {type(cache).__name__}")
        for i, (k, v) in enumerate(pairs):
            if k is None or v is None:
                raise InputError(f"layer {i} of the cache is empty (was the model run with use_cache=True?)")
        layers = [LayerKV(k.detach(), v.detach()) for k, v in pairs]
        return cls(layers, metadata=dict(metadata or {}), layout="hf")

    def to_hf(self, config=None, device=None):
        """A transformers `DynamicCache` that `model.generate(past_key_values=...)` accepts. Its
        layers hold this cache's tensors (moved to `device`), not copies."""
        return to_dynamic_cache(self, config, device)


def to_dynamic_cache(pairs, config=None, device=None):
    """A transformers `DynamicCache` from (key, value) pairs in layer order, taken one at a time
    (a generator's layers are added as they come). Its plain layers hold the given tensors
    (moved to `device`) as they are: `update` would copy each onto an empty tensor."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    first_plain = None
    for i, (key, value) in enumerate(pairs):
        first_plain = _add_layer(cache, i, key.to(device), value.to(device), first_plain)
    return cache


def _add_layer(cache, i: int, key: torch.Tensor, value: torch.Tensor, first_plain=None):
    """Layer `i` of `cache` set to (key, value): adopted by a plain `DynamicLayer`, through
    `update` for any other kind (a sliding window counts tokens). The first plain layer is made
    by an empty `update` (transformers initializes it); later ones of the same device and dtype
    copy its state, as an empty `update` creates two tensors on the device per layer. Returns
    the first plain layer (`first_plain` until there is one)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # a transformers without cache layers
        DynamicLayer = None
    layers = getattr(cache, "layers", None)
    replicate = getattr(cache, "layer_class_to_replicate", DynamicLayer)
    if layers is not None and i >= len(layers) and replicate is None:
        raise InputError(f"the model's config has {len(layers)} layers; the cache has more")
    if DynamicLayer is None or layers is None or not (i >= len(layers) or type(layers[i]) is DynamicLayer):
        cache.update(key, value, i)
        return first_plain
    like_first = first_plain is not None and (first_plain.keys.device, first_plain.keys.dtype,
                                              first_plain.values.dtype) == (key.device, key.dtype, value.dtype)
    if like_first and i <= len(layers) and (i == len(layers) or not layers[i].is_initialized):
        layer = copy.copy(first_plain)
        layer.keys, layer.values = key, value
        if i == len(layers):
            layers.append(layer)
        else:
            layers[i] = layer
        return first_plain
    cache.update(key[..., :0, :], value[..., :0, :], i)  # creates the layer, or initializes a config's
    layer = layers[i] if i < len(layers) else None
    if type(layer) is DynamicLayer and layer.keys.shape[-2] == 0 and layer.values.shape[-2] == 0:
        layer.keys, layer.values = key, value
        return first_plain if first_plain is not None else layer
    cache.update(key, value, i)
    return first_plain


def _end(lay: LayerKV) -> int:
    """One past the last position a layer holds."""
    if lay.positions is None:
        return lay.key.shape[2]
    return int(lay.positions.max()) + 1 if lay.positions.numel() else 0


def validate(cache: KVCache) -> None:
    """Raise InputError unless the cache has the shapes, dtypes and types the format stores."""
    if not isinstance(cache.layers, list) or not cache.layers:
        raise InputError("a cache needs at least one layer")
    for i, lay in enumerate(cache.layers):
        for name, t in (("key", lay.key), ("value", lay.value)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"layer {i} {name} is a {type(t).__name__}, not a tensor")
            if t.dim() != 4:
                raise InputError(
                    f"layer {i} {name} has shape {tuple(t.shape)}; expected 4 dims [batch, heads, tokens, head_dim]"
                )
            dtype_name(t.dtype)
            if min(t.shape[0], t.shape[1], t.shape[3]) < 1:
                raise InputError(f"layer {i} {name} has an empty batch, head or head_dim axis: {tuple(t.shape)}")
        if lay.key.shape[:3] != lay.value.shape[:3]:
            raise InputError(
                f"layer {i}: key {tuple(lay.key.shape)} and value {tuple(lay.value.shape)} differ in batch, heads or tokens"
            )
        if lay.positions is not None:
            p = lay.positions
            tokens, heads = lay.key.shape[2], lay.key.shape[1]
            if not isinstance(p, torch.Tensor) or p.dtype != torch.int64:
                raise InputError(f"layer {i} positions must be an int64 tensor")
            if p.dim() == 1:
                lay.positions = p = p.reshape(1, -1)
            if p.dim() != 2 or p.shape[1] != tokens or p.shape[0] not in (1, heads):
                raise InputError(f"layer {i} positions have shape {tuple(p.shape)}; expected [{tokens}] or [{heads}, {tokens}]")
    if cache.length is not None:
        if not isinstance(cache.length, int) or isinstance(cache.length, bool) or cache.length < 0:
            raise InputError(f"length must be a non-negative integer, not {cache.length!r}")
        for i, lay in enumerate(cache.layers):
            top = _end(lay)
            if top > cache.length:
                raise InputError(f"layer {i} holds position {top - 1}, beyond the cache's length {cache.length}")
    sel = cache.selection
    if sel is not None and not (isinstance(sel, dict) and isinstance(sel.get("id"), int) and isinstance(sel.get("name"), str)
                                and isinstance(sel.get("config"), dict)):
        raise InputError("selection must be a dict {id: int, name: str, config: dict}")
    if cache.token_ids is not None:
        t = cache.token_ids
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() not in (1, 2):
            raise InputError("token_ids must be an integer tensor [tokens] or [batch, tokens]")
        cache.token_ids = t.to(torch.int64).reshape(1, -1) if t.dim() == 1 else t.to(torch.int64)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in cache.metadata.items()):
        raise InputError("metadata must map strings to strings")
    for k, v in cache.metadata.items():
        try:
            k.encode("utf-8"), v.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"metadata {k[:40]!r} is not valid Unicode (a lone surrogate)") from None
