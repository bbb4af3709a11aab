"""Reading and writing caches in the layouts people already have on disk.

`.pt` files are loaded with `weights_only=True` (no arbitrary unpickling); safetensors files
use tensor names `layers.{i}.key` / `layers.{i}.value`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import zipfile

import torch

from kvcodec.cache import KVCache, LayerKV
from kvcodec.constants import LAYOUTS
from kvcodec.errors import InputError, KVCError
from kvcodec.files import atomic_output

TORCH_EXTENSIONS = (".pt", ".pth", ".bin")
SAFETENSORS_EXTENSION = ".safetensors"
# safetensors metadata keys that carry a pruned cache's length and selection stage
LENGTH_KEY, SELECTION_KEY, WINDOWS_KEY = "kvcodec.length", "kvcodec.selection", "kvcodec.windows"


def check_readable(path) -> str:
    """`path`, if it names a readable file; URLs pass as they are (their reader checks them)."""
    from kvcodec.container.remote import is_url

    if is_url(path):
        return path
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    return path


def load_cache(path, layout: str | None = None, heads: int | None = None) -> KVCache:
    """Load a cache file (.pt/.pth/.bin or .safetensors) in any supported layout."""
    from kvcodec.container.remote import is_url

    if is_url(path):
        raise InputError(f"{path}: caches are loaded from local files (download it first); .kvc files open from URLs")
    path = check_readable(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == SAFETENSORS_EXTENSION:
        return _load_safetensors(path)
    if ext == ".kvc":
        raise InputError(f"{path} is already a .kvc file")
    if ext not in TORCH_EXTENSIONS:
        raise InputError(f"{path}: unsupported extension {ext or '(none)'!r}; expected .pt, .pth, .bin or .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a forbidden class or function: just garbage
            raise InputError(f"{path} is not a PyTorch file (torch.save output) or is damaged") from None
        raise InputError(
            f"{path} holds pickled Python objects other than tensors; refusing to unpickle them "
            "(save plain tensors, lists, tuples or dicts)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError):
        raise InputError(f"{path} is not a PyTorch file (torch.save output) or is damaged") from None
    return from_object(obj, layout, heads)


def _is_tensor(x, dims: int | None = None) -> bool:
    return isinstance(x, torch.Tensor) and (dims is None or x.dim() == dims)


def detect_layout(obj) -> str:
    if isinstance(obj, dict):
        if {"keys", "values"} <= obj.keys() or {"key_cache", "value_cache"} <= obj.keys():
            return "dict"
        raise InputError(f"a dict cache needs 'keys'/'values' or 'key_cache'/'value_cache'; found {sorted(map(str, obj))[:8]}")
    if _is_tensor(obj, 6) and obj.shape[1] == 2:
        return "stacked"
    if isinstance(obj, (list, tuple)) and obj:
        if all(isinstance(p, (list, tuple)) and len(p) == 2 and _is_tensor(p[0], 4) and _is_tensor(p[1], 4) for p in obj):
            return "legacy"
        if len(obj) == 2 and _is_tensor(obj[0], 3) and _is_tensor(obj[1], 3):
            return "cachegen"
    raise InputError(f"cannot tell the cache layout of this {_describe(obj)}; pass --layout "
                     "(legacy, dict, stacked or cachegen)")


def _describe(obj) -> str:
    if _is_tensor(obj):
        return f"tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of {len(obj)} items"
    return type(obj).__name__


def from_object(obj, layout: str | None = None, heads: int | None = None) -> KVCache:
    """A KVCache from a loaded Python object in the given (or detected) layout."""
    layout = layout or detect_layout(obj)
    try:
        if layout == "legacy":
            return _from_legacy(obj)
        if layout == "dict":
            return _from_dict(obj)
        if layout == "stacked":
            return _from_stacked(obj)
        if layout == "cachegen":
            return _from_cachegen(obj, heads)
    except KVCError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError, AttributeError) as exc:
        raise InputError(f"input does not match layout {layout!r}: {exc}") from None
    raise InputError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS[:4])})")


def _from_legacy(obj) -> KVCache:
    if not isinstance(obj, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in obj):
        raise InputError("legacy layout is a list of (key, value) pairs, one per layer")
    return KVCache([LayerKV(k, v) for k, v in obj], layout="legacy")


def _from_dict(obj) -> KVCache:
    if not isinstance(obj, dict):
        raise InputError("dict layout needs a dict with 'keys' and 'values'")
    keys = obj.get("keys", obj.get("key_cache"))
    values = obj.get("values", obj.get("value_cache"))
    if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple)) or len(keys) != len(values):
        raise InputError("dict layout needs equally long lists 'keys' and 'values'")
    positions = obj.get("positions") or [None] * len(keys)
    if len(positions) != len(keys):
        raise InputError("'positions' needs one entry per layer")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise InputError("'metadata' must be a dict of strings")
    selection = obj.get("selection")
    if selection is not None and not (isinstance(selection, dict) and {"id", "name", "config"} <= selection.keys()):
        raise InputError("'selection' must be a dict with id, name and config")
    windows = obj.get("windows") or [None] * len(keys)
    if not isinstance(windows, (list, tuple)) or len(windows) != len(keys):
        raise InputError("'windows' needs one entry per layer")
    return KVCache([LayerKV(k, v, p, w) for k, v, p, w in zip(keys, values, positions, windows)],
                   token_ids=obj.get("token_ids"), metadata=dict(meta), layout="dict", length=obj.get("length"),
                   selection=selection)


def _from_stacked(obj) -> KVCache:
    if not _is_tensor(obj, 6) or obj.shape[1] != 2:
        raise InputError("stacked layout is one tensor [layers, 2, batch, heads, tokens, head_dim]")
    return KVCache([LayerKV(layer[0], layer[1]) for layer in obj], layout="stacked")


def _from_cachegen(obj, heads: int | None) -> KVCache:
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and _is_tensor(obj[0], 3) and _is_tensor(obj[1], 3)):
        raise InputError("cachegen layout is a pair of [layers, tokens, heads*head_dim] tensors")
    if not heads:
        raise InputError("cachegen layout needs --heads (the number of KV heads)")
    k, v = obj
    if k.shape[:2] != v.shape[:2] or k.shape[2] % heads or v.shape[2] % heads:
        raise InputError(f"cachegen tensors {tuple(k.shape)} and {tuple(v.shape)} do not split into {heads} heads")

    def split(t, i):
        return t[i].reshape(t.shape[1], heads, -1).permute(1, 0, 2).unsqueeze(0).contiguous()

    return KVCache([LayerKV(split(k, i), split(v, i)) for i in range(k.shape[0])], layout="cachegen")


def _load_safetensors(path) -> KVCache:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            meta = f.metadata() or {}
            layers, i = [], 0
            while f"layers.{i}.key" in names and f"layers.{i}.value" in names:
                pos = f.get_tensor(f"layers.{i}.positions") if f"layers.{i}.positions" in names else None
                layers.append(LayerKV(f.get_tensor(f"layers.{i}.key"), f.get_tensor(f"layers.{i}.value"), pos))
                i += 1
            ids = f.get_tensor("token_ids") if "token_ids" in names else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file: {exc}") from None
    if not layers:
        raise InputError(f"{path} has no tensors named layers.0.key / layers.0.value")
    meta = dict(meta)
    try:
        length = int(meta.pop(LENGTH_KEY)) if LENGTH_KEY in meta else None
        selection = json.loads(meta.pop(SELECTION_KEY)) if SELECTION_KEY in meta else None
        windows = json.loads(meta.pop(WINDOWS_KEY)) if WINDOWS_KEY in meta else [None] * len(layers)
    except ValueError:
        raise InputError(f"{path}: unreadable {LENGTH_KEY}, {SELECTION_KEY} or {WINDOWS_KEY} metadata") from None
    if not isinstance(windows, list) or len(windows) != len(layers):
        raise InputError(f"{path}: {WINDOWS_KEY} needs one entry per layer")
    for lay, window in zip(layers, windows):
        lay.window = window
    return KVCache(layers, token_ids=ids, metadata=meta, layout="safetensors", length=length, selection=selection)


def needs_dict(cache: KVCache) -> bool:
    """Whether the cache holds more than tensors (positions, windows, a length, a selection),
    which only the dict and safetensors layouts keep."""
    return (cache.length is not None or cache.selection is not None
            or any(l.positions is not None or l.window is not None for l in cache.layers))


def to_object(cache: KVCache, layout: str):
    """The cache as a plain Python object in `layout`, ready for torch.save."""
    if layout in ("legacy", "stacked", "cachegen") and needs_dict(cache):
        raise InputError(f"layout {layout!r} holds tensors only; this cache also has positions, sliding-window "
                         "layers or a length: use the dict layout or .safetensors")
    if layout == "legacy":
        return tuple((l.key, l.value) for l in cache.layers)
    if layout == "dict":
        obj = {"keys": [l.key for l in cache.layers], "values": [l.value for l in cache.layers],
               "metadata": dict(cache.metadata)}
        if any(l.positions is not None for l in cache.layers):
            obj["positions"] = [l.positions for l in cache.layers]
        if any(l.window is not None for l in cache.layers):
            obj["windows"] = [l.window for l in cache.layers]
        if cache.token_ids is not None:
            obj["token_ids"] = cache.token_ids
        if cache.length is not None:
            obj["length"] = cache.length
        if cache.selection is not None:
            obj["selection"] = cache.selection
        return obj
    shapes = {(tuple(l.key.shape), tuple(l.value.shape), l.key.dtype) for l in cache.layers}
    if layout in ("stacked", "cachegen") and len(shapes) != 1:
        raise InputError(f"layout {layout!r} needs all layers to have one shape and dtype; use legacy or dict")
    if layout == "stacked":
        if cache.layers[0].key.shape != cache.layers[0].value.shape:
            raise InputError("stacked layout needs keys and values of one shape")
        return torch.stack([torch.stack([l.key, l.value]) for l in cache.layers])
    if layout == "cachegen":
        if cache.layers[0].key.shape[0] != 1:
            raise InputError("cachegen layout holds batch 1 only")

        def merge(t):  # [1, heads, tokens, dim] -> [tokens, heads*dim]
            return t[0].permute(1, 0, 2).reshape(t.shape[2], -1)

        return (torch.stack([merge(l.key) for l in cache.layers]), torch.stack([merge(l.value) for l in cache.layers]))
    raise InputError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")


def save_cache(cache: KVCache, path, layout: str | None = None, overwrite: bool = False) -> str:
    """Write a cache to .pt (in `layout`, default the one it came in) or .safetensors.
    Returns the layout written."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == SAFETENSORS_EXTENSION or layout == "safetensors":
        if ext != SAFETENSORS_EXTENSION:
            raise InputError("the safetensors layout needs an output name ending in .safetensors")
        from safetensors.torch import save

        tensors = {}
        for i, l in enumerate(cache.layers):
            tensors[f"layers.{i}.key"] = l.key.contiguous()
            tensors[f"layers.{i}.value"] = l.value.contiguous()
            if l.positions is not None:
                tensors[f"layers.{i}.positions"] = l.positions.contiguous()
        if cache.token_ids is not None:
            tensors["token_ids"] = cache.token_ids.contiguous()
        meta = dict(cache.metadata)
        if cache.length is not None:
            meta[LENGTH_KEY] = str(cache.length)
        if cache.selection is not None:
            meta[SELECTION_KEY] = json.dumps(cache.selection, sort_keys=True)
        if any(l.window is not None for l in cache.layers):
            meta[WINDOWS_KEY] = json.dumps([l.window for l in cache.layers])
        data = save(tensors, metadata=meta)
        with atomic_output(path, overwrite) as f:
            f.write(data)
        return "safetensors"
    if ext not in TORCH_EXTENSIONS:
        raise InputError(f"{path}: output must end in .pt, .pth, .bin or .safetensors")
    layout = layout or ("dict" if needs_dict(cache) else cache.layout if cache.layout in LAYOUTS[:4] else "legacy")
    obj = to_object(cache, layout)
    with atomic_output(path, overwrite) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # torch reports a failed write (a full disk) as a RuntimeError
            raise OSError(errno.EIO, f"torch.save failed ({str(exc).splitlines()[0][:120]})") from None
    return layout
