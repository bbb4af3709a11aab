"""Entropy coding shared by the cachegen and ae codecs and the GPU kernels, in three layers:
`quantizer` (channel steps and the symbols a chunk quantizes to: direct, or anchors and deltas),
the entropy model and the coder. Two lane formats (spec 8.5): format 2, what cachegen writes,
is `shared_tables` (a few tables per tensor shared by its channels, 2**P slots each),
`shared_lanes` (a chunk's lanes) and `rans32` (32-bit-state rANS read by direct lookup, stepping
many lanes in lockstep); format 1, which ae's latents and earlier cachegen files use, is `tables`
(one table per channel) with `lanes` and `rans` (64-bit-state rANS through constriction)."""
