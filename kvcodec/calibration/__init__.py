"""A model's calibration for transform coding (`kvtc`): measured once per model on training
text, stored as a safetensors profile named by its sha256 (`kvc calibrate`).

- `rope`: the rotary embedding a profile records, undone on keys before coding and redone
  exactly on decoding.
- `profile`: the profile itself (per layer and key/value: mean, a decorrelating transform
  weighted by what the model is sensitive to, the layer's measured sensitivity), strict to read.
- `fit`: measuring a profile on a transformers model (imports transformers).
"""
