"""API-key authentication.

Keys come from ``--api-key`` (repeatable) and ``--api-key-file`` (one per line, ``#``
comments allowed). Clients send ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
A key is never logged or stored in a rate-limit backend: everything downstream sees a
short, stable *key id* derived from its hash.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenmill.server.errors import unauthorized


def key_id(key: str) -> str:
    """A short, non-reversible name for a key, safe for logs and metrics."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def load_api_keys(keys: Iterable[str] = (), key_file: str | Path | None = None) -> list[str]:
    """Collect keys from flags and an optional file; blank lines and ``#`` comments skip."""
    collected = [k.strip() for k in keys if k and k.strip()]
    if key_file is not None:
        for line in Path(key_file).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                collected.append(line)
    # Keep order, drop duplicates.
    return list(dict.fromkeys(collected))


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The key a client presented, from ``Authorization: Bearer`` or ``X-API-Key``."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = headers.get("x-api-key")
    if api_key and api_key.strip():
        return api_key.strip()
    return None


class ApiKeyAuth:
    """Checks presented keys against the configured set in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        # Compare digests so every comparison has the same length.
        self._digests = {hashlib.sha256(k.encode()).digest(): key_id(k) for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, headers: Mapping[str, str]) -> str | None:
        """Return the caller's key id (None when auth is off); raise a 401 APIError otherwise."""
        if not self.enabled:
            return None
        presented = extract_key(headers)
        if presented is None:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "or 'X-API-Key: <key>'."
            )
        digest = hashlib.sha256(presented.encode()).digest()
        found: str | None = None
        for known, kid in self._digests.items():
            if hmac.compare_digest(known, digest):
                found = kid
        if found is None:
            raise unauthorized("Incorrect API key provided.")
        return found

