"""Run inside the LMCache test environment: an engine configured with an unknown codec. Prints
whether the engine came up with a remote tier (it must not) as one JSON object.

    python lmcache_config_error.py FOLDER
"""

from __future__ import annotations

import json
import sys

from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache_engine import engine


def main():
    made = engine("misconfigured", sys.argv[1], "nosuchcodec", "{}")
    remote = made.storage_manager.storage_backends.get("RemoteBackend")
    print(json.dumps({"remote_tier": remote is not None and remote.connection is not None}), flush=True)
    LMCacheEngineBuilder.destroy("misconfigured")


if __name__ == "__main__":
    main()
