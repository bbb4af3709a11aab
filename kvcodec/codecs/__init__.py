"""Built-in codecs (ids and bitstreams in format_spec/kvc-v1.md, section 8)."""

from ..registry import register_codec
from .ae import AECodec
from .cachegen import CacheGenCodec
from .quant import QuantCodec
from .raw import RawCodec
from .zstd import ShuffleZstdCodec, ZstdCodec

for _cls in (RawCodec, ZstdCodec, ShuffleZstdCodec, QuantCodec, CacheGenCodec, AECodec):
    register_codec(_cls, builtin=True)

__all__ = ["RawCodec", "ZstdCodec", "ShuffleZstdCodec", "QuantCodec", "CacheGenCodec", "AECodec"]
