"""Model names of the Hugging Face Hub (`org/name`, `org/name@revision`) as local folders.

A model entry is a hub name only when it is not an existing path and has the `org/name`
form. It is looked up in the local cache first (no network); it is downloaded only when
`HF_HUB_OFFLINE` is unset, and through `huggingface_hub` (the optional extra `isofast[hub]`),
which is imported only when a hub name is met: local folders never need it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from isofast.errors import MergeInputError

__all__ = ["cache_dir", "is_hub_name", "local_model", "offline", "resolve"]

# org/name with an optional @revision (branch, tag or commit): the repo id grammar of the hub.
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
_TRUE = ("1", "on", "yes", "true")


def is_hub_name(entry: str) -> bool:
    return _HUB_NAME.match(entry) is not None and ".." not in entry


# Why a path that stayed a path was not found as a hub name (for the "does not exist" error).
_MISSED: dict[str, str] = {}


def local_model(entry: str, root: Path, strict: bool = True) -> str:
    """A model entry as an absolute local path: the path itself (relative to `root`) when it
    exists or cannot be a hub name, else the cached (or downloaded) snapshot folder. Not
    `strict` (flags, the API: a request is made before any file is read): the cache only, and
    a name not found there stays a path, which fails when opened (see `why_missing`)."""
    path = Path(entry) if Path(entry).is_absolute() else root / entry
    if path.exists() or not is_hub_name(entry):
        return os.path.abspath(path)
    try:
        return resolve(entry, missing=str(path), download=strict)
    except MergeInputError as exc:
        if strict:
            raise
        _MISSED[os.path.abspath(path)] = str(exc)
        return os.path.abspath(path)


def why_missing(path: str) -> str:
    """For a model path that does not exist: why it was not read as a hub name ('' if not)."""
    return _MISSED.get(path, "")


def cache_dir() -> str:
    """The hub cache, read from the environment on every call (huggingface_hub reads it once,
    at import, so a later change of HF_HUB_CACHE would go unseen)."""
    env = os.environ
    found = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if found:
        return os.path.expanduser(found)
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve(name: str, missing: str = "", download: bool = True) -> str:
    """The local snapshot folder of hub model `name` (`org/name[@revision]`)."""
    found = _HUB_NAME.match(name)
    if found is None:
        raise MergeInputError(f"{name!r} is not a Hugging Face model name (org/name[@rev])")
    repo, revision = found["repo"], found["rev"]
    cache = cache_dir()
    local = f"no local path {missing}; " if missing else ""
    try:
        import huggingface_hub
    except ImportError:
        raise MergeInputError(
            f"model {name!r}: {local}reading Hugging Face model names needs huggingface_hub: "
            "pip install 'isofast[hub]'"
        ) from None
    try:
        return _snapshot(huggingface_hub, repo, revision, cache, local_only=True)
    except Exception as exc:  # the library's error types differ across its versions
        cached = exc
    if offline() or not download:
        how = "HF_HUB_OFFLINE is set: " if offline() else ""
        raise MergeInputError(
            f"model {name!r}: {local}not in the Hugging Face cache {cache} "
            f"({type(cached).__name__}); {how}download it (`hf download {repo}`)"
            + (" or unset HF_HUB_OFFLINE" if how else "")
        ) from None
    try:
        return _snapshot(huggingface_hub, repo, revision, cache, local_only=False)
    except Exception as exc:  # no network, no such repo, gated, ...
        raise MergeInputError(
            f"model {name!r}: {local}not in the Hugging Face cache {cache}, and downloading "
            f"it failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def _snapshot(hub: Any, repo: str, revision: str | None, cache: str, local_only: bool) -> str:
    folder = hub.snapshot_download(
        repo, revision=revision, cache_dir=cache, local_files_only=local_only
    )
    return os.path.abspath(str(folder))
