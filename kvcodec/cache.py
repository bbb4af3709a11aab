"""`KVCache`: the in-memory data model every codec and file layout converts to and from."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from kvcodec.dtypes import dtype_name
from kvcodec.errors import InputError

MAX_LAYERS = 4096  # layers a cache (and a file) may have
MAX_WINDOW = 2**31 - 1  # the largest attention window a layer may record
TENSORS = ("key", "value")  # the two tensors of a layer, in the order files and codecs use


@dataclass
class LayerKV:
    """One layer: key `[batch, heads, tokens, head_dim]`, value likewise (head_dim may differ).

    `positions` (int64, `[tokens]` or `[heads, tokens]`) are the original sequence positions of
    the kept tokens; None means 0..tokens-1.

    `window` is the attention window of a sliding-window layer (a model's `sliding_window`: a
    query at position p sees keys at positions above p - window), None for full attention. Such
    a layer needs only its last window - 1 positions, and transformers keeps no more: a cache
    read from a model holds the tail of the sequence there, its positions recorded.
    """

    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor | None = None
    window: int | None = None

    def index_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Long [heads, n]: where the tokens at `positions` ([1 or heads, n], positions this
        layer holds) sit along its token axis."""
        heads = self.key.shape[1]
        positions = positions.to(torch.int64).expand(heads, -1).contiguous()
        if self.positions is None:
            return positions
        return torch.searchsorted(self.positions.expand(heads, -1).contiguous(), positions)

    def at(self, positions: torch.Tensor | None) -> "LayerKV":
        """This layer's tokens at `positions` (per head), as a pruned copy holding them would;
        itself when `positions` is None."""
        if positions is None:
            return self
        index = self.index_of(positions).to(self.key.device)
        b, h = self.key.shape[:2]

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.gather(2, index[None, :, :, None].expand(b, h, -1, t.shape[3]))

        return LayerKV(take(self.key), take(self.value), positions, self.window)


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
                          lay.positions, lay.window) for lay in self.layers]
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
        """From a transformers `DynamicCache` (or the legacy tuple of (key, value) pairs). Its
        sliding-window layers keep their window, and the positions of the tokens they still hold
        (the last window - 1 of the sequence); the cache then records the sequence's length."""
        if hasattr(cache, "layers") and cache.layers and hasattr(cache.layers[0], "keys"):
            found = [(lay.keys, lay.values, lay) for lay in cache.layers]
        elif hasattr(cache, "key_cache"):
            found = [(k, v, None) for k, v in zip(cache.key_cache, cache.value_cache)]
        elif isinstance(cache, (tuple, list)):
            found = [(pair[0], pair[1], None) if isinstance(pair, (tuple, list)) and len(pair) >= 2 else (None, None, None)
                     for pair in cache]
        else:
            raise InputError(f"cannot read a cache from {type(cache).__name__}")
        layers = []
        for i, (k, v, hf_layer) in enumerate(found):
            if k is None or v is None:
                raise InputError(f"layer {i} of the cache is empty (was the model run with use_cache=True?)")
            window, positions = _sliding_window(hf_layer), None
            if window is not None and hf_layer.cumulative_length != k.shape[-2]:  # it holds the sequence's tail
                positions = torch.arange(hf_layer.cumulative_length - k.shape[-2], hf_layer.cumulative_length)[None]
            layers.append(LayerKV(k.detach(), v.detach(), positions, window))
        out = cls(layers, metadata=dict(metadata or {}), layout="hf")
        if any(lay.positions is not None for lay in layers):
            out.length = out.next_position  # where the sequence the sliding layers counted ends
        return out

    def to_hf(self, config=None, device=None):
        """A transformers `DynamicCache` that `model.generate(cache=...)` accepts (the keyword is
        `past_key_values` before transformers 5). Its layers hold this cache's tensors (moved to
        `device`), not copies; sliding-window layers (from the cache, or from `config`) count the
        whole sequence, as the model's own do."""
        return to_dynamic_cache(self.layers, self.next_position, config, device)


def _sliding_window(layer) -> int | None:
    """The window of a transformers sliding-window cache layer (which counts the tokens it has
    seen), None for any other layer or None."""
    if getattr(layer, "is_sliding", False) and hasattr(layer, "cumulative_length"):
        window = getattr(layer, "sliding_window", None)
        return int(window) if window is not None else None
    return None


def to_dynamic_cache(layers, length: int, config=None, device=None):
    """A transformers `DynamicCache` from `LayerKV`s in layer order, taken one at a time (a
    generator's layers are added as they come); `length` is the sequence length the cache
    continues from. Its plain layers hold the given tensors (moved to `device`) as they are:
    `update` would copy each onto an empty tensor. A layer is a sliding-window layer where the
    config says so (the config's window must agree with one the layer records) or, without a
    config, where the layer records a window."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    first_plain = None
    for i, lay in enumerate(layers):
        key, value = lay.key.to(device), lay.value.to(device)
        made = cache.layers[i] if config is not None and i < len(cache.layers) else None
        window = _sliding_window(made) if made is not None else lay.window
        if made is not None and lay.window is not None and window != lay.window:
            raise InputError(f"layer {i} has an attention window of {lay.window} tokens; the model's config says "
                             f"{'full attention' if window is None else window}")
        if window is None:
            first_plain = _add_layer(cache, i, key, value, first_plain)
        else:
            _add_sliding_layer(cache, i, lay, key, value, window, length, made)
    return cache


def _add_sliding_layer(cache, i: int, lay: LayerKV, key: torch.Tensor, value: torch.Tensor, window: int,
                       length: int, made=None) -> None:
    """Layer `i` of `cache` as transformers' sliding-window layer (`made`, or a new one): the
    last window - 1 tokens of a sequence of `end` tokens (from the layer's positions, else
    `length`), which is what such a layer holds and what the attention mask assumes."""
    try:
        from transformers.cache_utils import DynamicSlidingWindowLayer
    except ImportError:
        raise InputError(f"layer {i} is a sliding-window layer; this transformers has no such cache layers") from None
    end = _end(lay) if lay.positions is not None else length
    keep = min(end, window - 1)
    held = key.shape[2]
    tail = torch.arange(end - held, end)
    if held < keep or (lay.positions is not None and not bool((lay.positions == tail).all())):
        raise InputError(f"layer {i} is a sliding-window layer of {window} tokens holding {held} tokens that are not the "
                         f"last {keep} of the sequence: transformers cannot continue it")
    layer = made if made is not None else DynamicSlidingWindowLayer(sliding_window=window)
    layer.lazy_initialization(key[..., :0, :], value[..., :0, :])
    layer.keys, layer.values = key[..., held - keep:, :], value[..., held - keep:, :]
    layer.cumulative_length = end
    if made is None:
        if i < len(cache.layers):
            cache.layers[i] = layer
        else:
            cache.layers.append(layer)


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
    return sequence_end(lay.key.shape[2], lay.positions)


def sequence_end(tokens: int, positions: torch.Tensor | None) -> int:
    """One past the last position a layer of `tokens` tokens holds (at `positions`, or
    0..tokens-1 without them)."""
    if positions is None:
        return tokens
    return int(positions.max()) + 1 if positions.numel() else 0


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
        if lay.window is not None and (not isinstance(lay.window, int) or isinstance(lay.window, bool)
                                       or not 1 <= lay.window <= MAX_WINDOW):
            raise InputError(f"layer {i} window must be an integer from 1 to {MAX_WINDOW}, not {lay.window!r}")
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
