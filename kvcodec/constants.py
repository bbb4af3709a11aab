"""Defaults and names that the library and the `kvc` command line share, in a module that
imports nothing: `kvc --help` shows them without loading torch. The modules that use them import
them from here."""

DEFAULT_CHUNK_TOKENS = 1024  # tokens per independently decodable chunk (record) of a .kvc file

LAYOUTS = ("legacy", "dict", "stacked", "cachegen", "safetensors")  # cache files: the .pt layouts, then safetensors
