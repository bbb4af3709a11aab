"""The `kvc` command-line tools (installed as `kvcodec.tools`)."""
