"""Learned autoencoders for KV vectors: each key or value vector of a head is mapped to a short
latent and back (the `ae` codec stores the latents).

Keys and values have separate networks. Each is a two-layer MLP encoder and decoder with inputs
normalized per (layer, channel); its weights are either one set per layer, or one set shared by
all layers with a learned per-layer embedding added to the hidden units (`shared`). Weights and
their config travel as one safetensors file whose sha256 names them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from kvcodec.artifacts import sha256
from kvcodec.cache import TENSORS
from kvcodec.errors import CodecError, InputError

FORMAT = "kvcodec-ae-1"
METADATA_KEY = "kvcodec_ae"


@dataclass
class AEConfig:
    """What a trained autoencoder fits and how it was made."""

    layers: int
    heads: int
    head_dim: dict  # {"key": D, "value": D}
    latent_dim: int
    hidden: int = 128
    shared: bool = False
    model: str = ""
    texts: dict = field(default_factory=dict)  # training text name -> sha256

    def check_fits(self, num_layers: int, chunks) -> None:
        """CodecError unless a cache of `num_layers` whose chunks are `chunks` ((ChunkInfo,
        tensor) pairs) has the shape these weights were trained on."""
        if num_layers != self.layers:
            raise CodecError(f"ae: the weights fit {self.layers} layers, the cache has {num_layers}")
        for info, _ in chunks:
            _, h, _, d = info.shape
            if h != self.heads or d != self.head_dim[info.tensor]:
                raise CodecError(f"ae: layer {info.layer} {info.tensor} has {h} heads of {d}; the weights fit "
                                 f"{self.heads} heads of {self.head_dim[info.tensor]}")


class VectorAE(torch.nn.Module):
    """Encoder and decoder for one tensor kind of every layer. Inputs are [layers, n, dim]: a
    batch of vectors per layer, all layers at once (training) or one layer (`layers=slice(i, i+1)`)."""

    def __init__(self, layers: int, dim: int, latent: int, hidden: int, shared: bool):
        super().__init__()
        slots = 1 if shared else layers
        self.shared = shared

        def weight(n_in, n_out):
            return torch.nn.Parameter(torch.randn(slots, n_in, n_out) / math.sqrt(n_in))

        def bias(n):
            return torch.nn.Parameter(torch.zeros(slots, n))

        self.w_in, self.b_in = weight(dim, hidden), bias(hidden)
        self.w_latent, self.b_latent = weight(hidden, latent), bias(latent)
        self.w_up, self.b_up = weight(latent, hidden), bias(hidden)
        self.w_out, self.b_out = weight(hidden, dim), bias(dim)
        embed = torch.zeros(layers if shared else 0, hidden)
        self.embed_in, self.embed_up = torch.nn.Parameter(embed.clone()), torch.nn.Parameter(embed.clone())
        self.register_buffer("mean", torch.zeros(layers, dim))
        self.register_buffer("std", torch.ones(layers, dim))

    def _linear(self, x, w, b, layers: slice, embed=None):
        """x @ W + b with the weights of `layers` (of the one shared slot), plus the layers'
        embedding where the weights are shared."""
        slot = slice(0, 1) if self.shared else layers
        y = torch.matmul(x, w[slot]) + b[slot][:, None]
        return y + embed[layers][:, None] if self.shared and embed is not None else y

    def encode(self, x: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        x = (x - self.mean[layers][:, None]) / self.std[layers][:, None]
        h = torch.nn.functional.silu(self._linear(x, self.w_in, self.b_in, layers, self.embed_in))
        return self._linear(h, self.w_latent, self.b_latent, layers)

    def decode(self, z: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        h = torch.nn.functional.silu(self._linear(z, self.w_up, self.b_up, layers, self.embed_up))
        y = self._linear(h, self.w_out, self.b_out, layers)
        return y * self.std[layers][:, None] + self.mean[layers][:, None]


class CacheAutoencoder(torch.nn.Module):
    """The key and the value autoencoder of one model shape, with their config."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.nets = torch.nn.ModuleDict({name: VectorAE(config.layers, config.head_dim[name], config.latent_dim,
                                                        config.hidden, config.shared) for name in TENSORS})

    def encode(self, tensor: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[batch, heads, tokens, dim] of one layer -> latents [batch, heads, tokens, latent]."""
        shape = x.shape
        z = self.nets[tensor].encode(x.reshape(1, -1, shape[-1]).float(), slice(layer, layer + 1))
        return z.reshape(*shape[:-1], -1)

    def decode(self, tensor: str, layer: int, z: torch.Tensor) -> torch.Tensor:
        shape = z.shape
        x = self.nets[tensor].decode(z.reshape(1, -1, shape[-1]).float(), slice(layer, layer + 1))
        return x.reshape(*shape[:-1], -1)

    # -- files ---------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        # one metadata entry: safetensors does not keep the order of several, and the bytes name the weights
        doc = json.dumps({"format": FORMAT, "config": asdict(self.config)}, sort_keys=True)
        return save(tensors, metadata={METADATA_KEY: doc})

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "ae weights") -> "CacheAutoencoder":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(bytes(data))
            doc = json.loads(_metadata(bytes(data))[METADATA_KEY])
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            config = AEConfig(**doc["config"])
            expected = expected_shapes(config)  # before building anything of the config's size
            if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
                raise ValueError("its tensors do not have the shapes its config describes")
            model = cls(config)
            model.load_state_dict(tensors, strict=True)
        except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise CodecError(f"{where} are not a kvcodec autoencoder ({str(exc).splitlines()[0][:200]})") from None
        return model.eval()

    def save(self, path) -> str:
        """Write the weights (and `<path>.json`, their config); return their sha256."""
        from kvcodec.files import atomic_output

        data = self.to_bytes()
        with atomic_output(path, overwrite=True) as f:
            f.write(data)
        digest = sha256(data)
        doc = {**asdict(self.config), "sha256": digest, "weights": os.path.basename(os.fspath(path))}
        with atomic_output(os.path.splitext(os.fspath(path))[0] + ".json", overwrite=True) as f:
            f.write((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        return digest

    @classmethod
    def load(cls, path) -> "CacheAutoencoder":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such autoencoder weights file")
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), path)


def expected_shapes(config: AEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape for `config` (computed, not allocated: a file's config is untrusted)."""
    for name in ("layers", "latent_dim", "hidden"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise ValueError(f"{name} must be a positive integer")
    layers, z, m = config.layers, config.latent_dim, config.hidden
    slots, embed = (1, layers) if config.shared else (layers, 0)
    out = {}
    for kind in TENSORS:
        d = config.head_dim.get(kind) if isinstance(config.head_dim, dict) else None
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"head_dim of {kind} must be a positive integer")
        shapes = {"mean": (layers, d), "std": (layers, d), "w_in": (slots, d, m), "b_in": (slots, m),
                  "w_latent": (slots, m, z), "b_latent": (slots, z), "w_up": (slots, z, m), "b_up": (slots, m),
                  "w_out": (slots, m, d), "b_out": (slots, d), "embed_in": (embed, m), "embed_up": (embed, m)}
        out.update({f"nets.{kind}.{k}": v for k, v in shapes.items()})
    return out


def _metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors byte string."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


