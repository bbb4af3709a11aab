"""Entropy coding shared by the cachegen and ae codecs and the GPU kernels, in three layers:
`quantizer` (channel steps and the symbols a chunk quantizes to: direct, or anchors and deltas),
`tables` (the entropy model: one probability table per channel, fitted on a file's symbols and
stored as one blob) and `lanes` with `rans` (the coder: every channel of a chunk an independent
rANS lane, so lanes decode in parallel)."""
