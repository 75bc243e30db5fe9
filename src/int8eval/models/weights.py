"""Where published weights come from without the internet: the torch hub cache (TORCH_HOME), the Hugging Face cache
(HF_HOME, HF_HUB_CACHE), or a local file. A download is tried only when the cache misses and the host answers a
one-second connection probe: offline, urllib and huggingface_hub would otherwise retry for about a minute before
failing (measured here: 48 s for one timm model with no DNS)."""

from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from int8eval.errors import ModelLoadError

PROBE_TIMEOUT_S = 1.0
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in its order
_OFFLINE_VALUES = {"1", "on", "yes", "true"}


def hf_offline() -> bool:
    """True when the user has told huggingface_hub to stay offline (HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _proxy_for(scheme: str) -> str | None:
    for key in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if os.environ.get(key):
            return os.environ[key]
    return None


@lru_cache(maxsize=None)
def reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host (or its proxy) opens within `timeout_s`. The probe runs in a
    daemon thread because name resolution has no timeout of its own: a hung resolver must not hang the run."""
    parts = urlsplit(_proxy_for(urlsplit(url).scheme) or url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def torch_hub_file(url: str) -> Path:
    """Where torch.hub keeps the download of `url` (honours TORCH_HOME)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name


def hf_cached_file(hf_hub_id: str, filenames: tuple[str, ...] = HF_WEIGHT_FILES) -> Path | None:
    """The first of `filenames` of the Hugging Face repo `hf_hub_id` ("repo" or "repo@revision") already in the local
    cache (honours HF_HOME / HF_HUB_CACHE), else None. Looks only on disk."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hf_hub_id.partition("@")
    for name in filenames:
        found = try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline_error(model: str, looked: str, url: str, *, why: str) -> ModelLoadError:
    """The error for weights that are neither cached nor downloadable: what, where it looked, and what to do."""
    return ModelLoadError(
        f"{model}: no weights in {looked}, and {why}. Download {url} on a machine with internet and pass it with "
        "--weights-file PATH (or put it in that cache), or run where the internet is reachable"
    )
