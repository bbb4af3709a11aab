"""The shipped texts (evaluation and training) and how much of them a capture or an evaluation
reads by default. Nothing heavy is imported here: `kvc --help` lists the texts and shows the
defaults without loading torch."""

from __future__ import annotations

import os
from pathlib import Path

from kvcodec.errors import InputError

TEXTS_DIR = Path(__file__).parent / "data" / "texts"
TRAINING_DIR = Path(__file__).parent / "data" / "train"  # disjoint from the evaluation texts

DEFAULT_TOKENS = 1024  # what a capture reads of a text unless told
DEFAULT_WINDOW = 64  # last queries of a prefix whose attention a capture with scores records
DEFAULT_PREFIX = 1536  # an evaluation's prefix, whose cache is compressed
DEFAULT_CONTINUATION = 512  # the tokens then scored teacher-forced on the restored cache
DEFAULT_GREEDY = 64  # the tokens then generated greedily to compare


def shipped_texts() -> dict[str, Path]:
    """The evaluation texts, by name."""
    return {p.stem: p for p in sorted(TEXTS_DIR.glob("*.txt"))}


def training_texts() -> dict[str, Path]:
    """The texts autoencoders train on, by name (`train-prose`, ...)."""
    return {f"train-{p.stem}": p for p in sorted(TRAINING_DIR.glob("*.txt"))}


def read_text(text: str | os.PathLike | None) -> tuple[str, str]:
    """(name, contents) of a shipped text name or a path; default the shipped prose."""
    texts = {**shipped_texts(), **training_texts()}
    if text is None:
        text = "prose"
    if isinstance(text, str) and text in texts:
        return text, texts[text].read_text(encoding="utf-8")
    path = Path(text)
    if not path.is_file():
        raise InputError(f"{text}: no such text file (shipped texts: {', '.join(texts)})")
    try:
        return path.name, path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{text}: cannot read as UTF-8 text ({type(exc).__name__})") from None
