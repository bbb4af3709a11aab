"""Triton GPU paths (`kvcodec.kernels`): decoders that turn a file's records into the cache
tensors on the GPU, bit-exact with the CPU decoders, and encoders giving the CPU's bytes.

They plug in beside the codecs through `kvcodec.codecs.device`: each built-in codec names its
module here in `device_decoder` / `device_encoder` (`raw`, `quant`, `cachegen`, `ae`), and the
reader's device path (`kvcodec.container.device_read`) stages payloads, verifies them with
`checksum` (the payloads' CRC-32 on the GPU) and calls them. Shared pieces: `jobs` (the job
table's columns and grids), `tiles` (a token tile's place), `rounding`, and the entropy-coded
lanes' `shared_lane_decode` and `shared_lane_encode` (lane format 2) and `lane_decode` and
`lane_encode` (lane format 1). Under `TRITON_INTERPRET=1` the
same kernels run on CPU tensors (`decoder="kernels"`), which is how CI tests them.
"""
