"""Triton GPU decode paths for kvcodec's codecs (installed as `kvcodec.kernels`)."""
