"""Token selection stages: which tokens of each (layer, KV head) a pruned cache keeps.

A stage runs before the value codec (`h2o+cachegen`); see `base.Selector`."""

from kvcodec.registry import register_selector
from kvcodec.selection.base import Selector, needing_no_scores
from kvcodec.selection.merging import CaM
from kvcodec.selection.positional import LaCache, StreamingLLM
from kvcodec.selection.scored import H2O, Keyformer, KeyNorm, SnapKV

for _cls in (H2O, Keyformer, SnapKV, KeyNorm, StreamingLLM, LaCache, CaM):
    register_selector(_cls, builtin=True)

__all__ = ["Selector", "needing_no_scores", "H2O", "Keyformer", "SnapKV", "KeyNorm", "StreamingLLM", "LaCache", "CaM"]
