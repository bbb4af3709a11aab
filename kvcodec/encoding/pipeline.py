"""Pipelines `SELECTION+CODEC` (`h2o+cachegen`): an optional token-selection stage that prunes
the cache, then the value codec that encodes what is kept. A selection name alone stores the
kept tokens with `raw`. Options go to the stage that has them; `stage.option` addresses one
stage explicitly (`h2o.keep=0.25`, `cachegen.quality=low`)."""

from __future__ import annotations

from dataclasses import dataclass

from kvcodec.codecs.base import Codec
from kvcodec.errors import CodecError
from kvcodec.registry import CODECS, SELECTORS, codec_class, selector_class

DEFAULT_VALUE_CODEC = "raw"


@dataclass
class Pipeline:
    selector: object | None  # a selection.Selector
    codec: object  # codec name, Codec or Encoding
    options: dict  # the codec's options when `codec` is a name

    def prune(self, cache, scores=None):
        """The cache the value codec encodes: pruned by the stage, or as it is."""
        return cache if self.selector is None else self.selector.select(cache, scores)


def parse(spec, options: dict | None = None) -> Pipeline:
    """Split `spec` into its stages and route `options` to them."""
    options = dict(options or {})
    if not isinstance(spec, str):
        return Pipeline(None, spec, options)
    parts = spec.split("+")
    if len(parts) > 2 or not all(parts):
        raise CodecError(f"{spec!r}: a pipeline is SELECTION+CODEC, e.g. h2o+cachegen")
    if len(parts) == 2:
        if parts[0] in CODECS:
            raise CodecError(f"{spec!r}: {parts[0]!r} is a value codec; the first stage must be a selection method "
                             f"({', '.join(c.name for c in SELECTORS.all())})")
        select_cls, codec_name = selector_class(parts[0]), parts[1]
        if codec_name in SELECTORS:
            raise CodecError(f"{spec!r}: one selection stage per pipeline, then a value codec")
    elif parts[0] in SELECTORS:
        select_cls, codec_name = selector_class(parts[0]), DEFAULT_VALUE_CODEC
    else:
        select_cls, codec_name = None, parts[0]
    codec_cls = codec_class(codec_name)
    stages = ([(select_cls.name, select_cls)] if select_cls else []) + [(codec_name, codec_cls)]
    routed: dict[str, dict] = {name: {} for name, _ in stages}
    for key, value in options.items():
        stage, dot, option = key.partition(".")
        if dot:
            if stage not in routed:
                raise CodecError(f"option {key!r} names stage {stage!r}, which {spec!r} does not have")
        else:
            owners = [name for name, cls in stages if key in cls.option_names()]
            if len(owners) > 1:
                raise CodecError(f"option {key!r} belongs to both {' and '.join(owners)}: "
                                 f"write {owners[0]}.{key} or {owners[1]}.{key}")
            if not owners and len(stages) > 1:
                known = "; ".join(f"{name}: {', '.join(cls.option_names()) or 'none'}" for name, cls in stages)
                raise CodecError(f"no stage of {spec!r} has option {key!r} ({known})")
            stage, option = (owners[0] if owners else stages[-1][0]), key
        routed[stage][option] = value
    selector = select_cls.from_config(routed[select_cls.name]) if select_cls else None
    return Pipeline(selector, codec_name, routed[codec_name])


def checked(spec, options: dict | None = None) -> Pipeline:
    """`parse`, then build the codec once too, so a bad codec or option fails before any work."""
    pipe = parse(spec, options)
    if isinstance(pipe.codec, str):
        codec_class(pipe.codec).from_config(pipe.options)
    return pipe


def label(selector, codec: Codec) -> str:
    """`h2o keep=0.5 + cachegen quality=medium`: how reports name a pipeline."""
    parts = [selector, codec] if selector is not None else [codec]
    return " + ".join(" ".join([p.name] + [f"{k}={v}" for k, v in p.get_config().items()]) for p in parts)
