"""A model name as a local directory: the path itself, or a hub id through the Hugging Face cache.

Without torch, so a script can resolve its model (and start a child process on it) before its
heavy imports."""
from __future__ import annotations

import os
import re
from pathlib import Path

from common.errors import InputError

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_dir(name: str, flag: str) -> Path:
    """A local model directory, or a hub id resolved through the local Hugging Face cache.

    A hub id is looked up with `local_files_only` first; only when that fails and the hub
    is not switched off (`HF_HUB_OFFLINE`) is it downloaded. Failures say why.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{flag} {name}: no config.json there, not a Hugging Face model directory")
        return path
    if path.exists():
        raise InputError(f"{flag} {name}: is a file, expected a model directory")
    if not HUB_ID.match(name):
        raise InputError(f"{flag} {name}: no such directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(f"{flag} {name}: no such directory (and huggingface_hub is not installed)") from None
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as error:
        if type(error).__name__ == "HFValidationError":  # e.g. "out/llama--fq": a path, not a hub id
            raise InputError(f"{flag} {name}: no such directory, and not a Hugging Face hub id") from None
        if hub_offline():
            raise InputError(f"{flag} {name}: no such directory, and not a model in the Hugging Face cache "
                             "(HF_HUB_OFFLINE is set, so the hub is not asked); download it once where there "
                             "is network, or pass a local directory") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, etag_timeout=5))
    except Exception as error:  # the hub client raises many types; name the cause
        raise InputError(f"{flag} {name}: {_hub_failure(error)}") from None


def _hub_failure(error: Exception) -> str:
    """Why a hub download failed, in words, with what to do."""
    kind = type(error).__name__
    if kind == "GatedRepoError":
        return ("a gated model: accept its license on its hub page and log in (hf auth login), "
                "or pass a local directory")
    if kind in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return ("no such directory, and not a model in the Hugging Face cache or on the hub (a typo, or a "
                "private model: log in with hf auth login)")
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in str(error).lower() \
            or kind in ("ConnectError", "ConnectionError", "ConnectTimeout", "TimeoutException"):
        return ("no such directory, and not a model in the Hugging Face cache; the hub cannot be reached "
                "(no network?): pass a local directory, or set HF_HUB_OFFLINE=1 to skip the hub lookup")
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else kind
    return (f"no such directory, and the Hugging Face hub download failed ({kind}: {reason}); "
            "pass a local directory, or set HF_HUB_OFFLINE=1 to use the cache only")
