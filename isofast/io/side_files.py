"""Copying the non-weight files of a model folder (config, tokenizer, ...) next to a merge."""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from isofast.io.errors import CheckpointError

__all__ = ["SIDE_FILE_PATTERNS", "copy_side_files", "is_weight_file_name"]

# Top-level files a Hugging Face model folder needs besides its weights.
SIDE_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template*",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
    "feature_extractor_config.json",
    "open_clip_config.json",
    # remote code ("trust_remote_code") the config points at
    "configuration_*.py",
    "modeling_*.py",
    "tokenization_*.py",
    "processing_*.py",
    "image_processing_*.py",
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".gguf")


def is_weight_file_name(name: str) -> bool:
    """Whether a file name looks like weights or a weight index (never copied as a side file)."""
    return name.endswith(_WEIGHT_SUFFIXES)


def copy_side_files(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    patterns: Iterable[str] = SIDE_FILE_PATTERNS,
) -> list[str]:
    """Copy the top-level files of `src_dir` matching `patterns` into `dst_dir`.

    Symlinks are followed (Hugging Face cache snapshots are links into a blob store), weight
    files are never copied, and a file already present in `dst_dir` is left alone, so a
    side file written earlier (e.g. an edited config.json) wins. Returns the copied names.
    Each copy is fsync'ed.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder; cannot copy side files from it")
    pats = tuple(patterns)
    copied: list[str] = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if is_weight_file_name(name) or not any(fnmatch.fnmatchcase(name, p) for p in pats):
            continue
        if not entry.is_file() or (dst / name).exists():
            continue
        with open(entry, "rb") as fin, open(dst / name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        copied.append(name)
    return copied
