"""kvcodec inside serving stacks: plugins that make `.kvc` the stored form of their cache tiers.
Each module imports its stack only when used (install the matching extra)."""
