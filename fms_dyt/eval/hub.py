"""Is the Hugging Face hub reachable? If not, Hugging Face libraries go offline (the cache only)."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("fms_dyt.eval")

DEFAULT_ENDPOINT = "https://huggingface.co"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_if_hub_unreachable(timeout: float = 3.0) -> bool:
    """Switch Hugging Face libraries to offline mode when the hub cannot be reached.

    Without this, ``datasets`` retries an unreachable hub for ~25 s per dataset before failing.
    The probe is one HEAD request to ``$HF_ENDPOINT`` (its scheme, host and port) through the
    proxies of the environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``), as the Hugging
    Face libraries would reach it; any HTTP answer below 500 counts as reachable. Must run before
    ``datasets``/``huggingface_hub`` are imported (they read the variables then). Returns True
    when offline mode is on (set here or by the user).
    """
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS):
        _go_offline()
        return True
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    # The default opener's ProxyHandler reads urllib.request.getproxies() and honours NO_PROXY.
    opener = urllib.request.build_opener()
    try:
        opener.open(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return False
    except urllib.error.HTTPError as e:  # an answer; 5xx: the hub, or what a proxy reached, is down
        if e.code < 500:
            return False
        why: Exception = e
    except (OSError, ValueError) as e:  # URLError, timeouts, TLS failures; ValueError: a malformed URL
        why = e
    via = _proxy_for(endpoint)
    log.warning("%s is unreachable%s (%s): using the local Hugging Face cache only",
                endpoint, f" through the proxy {via}" if via else "", why)
    _go_offline()
    return True


def _proxy_for(url: str) -> str | None:
    """The proxy urllib uses for ``url``, None when it connects directly."""
    parts = urlparse(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    return None if proxy is None or urllib.request.proxy_bypass(parts.hostname or "") else proxy


def _go_offline() -> None:
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"


def is_offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1"


def prefetch_command(tasks: list[str], include_paths: list[Path] = ()) -> str:
    """The command that downloads the data of ``tasks`` into the Hugging Face cache."""
    extra = "".join(f" --include-path {p}" for p in include_paths)
    return f"python eval/prefetch.py --tasks {' '.join(tasks)}{extra}"
