"""Triton GPU paths (`kvcodec.kernels`): decoders that turn a file's records into the cache
tensors on the GPU, bit-exact with the CPU decoders, and the cachegen/ae lane encoders.

They plug in beside the codecs through `kvcodec.codecs.device`: each built-in codec names its
module here in `device_decoder` / `device_encoder`, and the reader's device path
(`kvcodec.container.device_read`) stages payloads and calls them. Under `TRITON_INTERPRET=1`
the same kernels run on CPU tensors (`decoder="kernels"`), which is how CI tests them.
"""
