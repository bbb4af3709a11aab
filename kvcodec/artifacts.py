"""Files a codec's output depends on but does not hold (learned weights, calibration
profiles), named by the sha256 of their bytes: a header records `sha256:<hex>`, and decoding
finds the file by that hash in a search path, so no path on one machine ever matters to a file.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from kvcodec.errors import CodecError

HASH = re.compile(r"sha256:[0-9a-f]{64}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Artifacts:
    """One kind of artifact (`what`, e.g. "ae weights", in files of `file_name`, e.g. "weights"): looked up by hash in the folders of the
    environment variable `env` and then `folder`, or in files this process was given by path."""

    def __init__(self, what: str, env: str, folder: Path, file_name: str):
        self.what, self.env, self.folder, self.file_name = what, env, folder, file_name
        self._given: dict[str, str] = {}  # sha256 -> path, for the files named by path here

    def search_folders(self) -> list[Path]:
        return [Path(p) for p in os.environ.get(self.env, "").split(os.pathsep) if p] + [self.folder]

    def remember(self, path: str) -> str:
        """`sha256:<hex>` of the file at `path`, which encoding then finds by that hash."""
        if not os.path.isfile(path):
            raise CodecError(f"{path}: no such {self.file_name} file")
        digest = sha256(Path(path).read_bytes())
        self._given[digest] = path
        return f"sha256:{digest}"

    def find(self, digest: str) -> bytes:
        """The bytes whose sha256 is `digest`, from the search folders."""
        for folder in self.search_folders():
            for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                data = path.read_bytes()
                if sha256(data) == digest:
                    return data
        where = ", ".join(str(f) for f in self.search_folders())
        raise CodecError(f"{self.what} sha256:{digest[:16]}... are not embedded in the file and not found in "
                         f"{where} (set {self.env} to the folder holding them)")

    def named(self, digest: str) -> bytes:
        """The bytes whose sha256 is `digest`: the file given by path, else from the search folders."""
        path = self._given.get(digest)
        if path is not None and os.path.isfile(path):
            data = Path(path).read_bytes()
            if sha256(data) == digest:
                return data
        return self.find(digest)
