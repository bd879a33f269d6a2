"""The Prefect server: where it is (``--api-url``, PREFECT_API_URL) and whether it answers.

``check_server`` asks ``<api>/health`` (never through a proxy) and raises ServerUnreachableError
with the fix; ``prefect_api`` points the flows called inside it at a checked server, or lets
Prefect start a temporary one. The server itself is started by ``scripts/prefect_server.sh``.
Prefect is imported only when a URL is set (``prefect_api``) or already loaded (``api_url_from_env``).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from flows.errors import ServerUnreachableError

DEFAULT_API_URL = "http://127.0.0.1:4200/api"  # scripts/prefect_server.sh


def api_url_from_env() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile, if one is set."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    if "prefect" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value() or None
    return None


def check_server(api_url: str, timeout: float = 3.0) -> None:
    """Raise ServerUnreachableError unless ``<api_url>/health`` answers within ``timeout`` s."""
    url = api_url.rstrip("/") + "/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(url, timeout=timeout) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise ServerUnreachableError(
        f"the Prefect server at {api_url} is unreachable ({reason}; checked {url} with a {timeout:g} s timeout). "
        "Start it with `scripts/prefect_server.sh`, or unset PREFECT_API_URL to run with a temporary server."
    )


@contextmanager
def prefect_api(api_url: str | None = None) -> Iterator[str | None]:
    """Use ``api_url`` (else PREFECT_API_URL) after checking that it answers; with neither set,
    flows called inside run on a temporary server. Yields the URL (None for temporary)."""
    url = api_url or api_url_from_env()
    if not url:
        yield None
        return
    check_server(url)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url
