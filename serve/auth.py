"""Bearer API keys from the environment (``PLURISTEER_API_KEYS``: comma-separated). Only sha256 digests are
kept in memory, comparisons are constant-time, and no key is ever logged or echoed."""

from __future__ import annotations

import hashlib
import hmac
import os


class AuthError(RuntimeError):
    """Keys are required but none are configured."""


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    @classmethod
    def from_env(cls, name: str, *, required: bool = True) -> KeyRing | None:
        """The keys in ``$name``; ``None`` when auth is off. Raises :class:`AuthError` if required and unset."""
        if not required:
            return None
        keys = [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]
        if not keys:
            raise AuthError(
                f"no API keys: set {name} (comma-separated) in the environment of the Ray cluster "
                "(on Kubernetes: a Secret, see cluster/k8s/rayservice.yaml), or set `auth: false` to serve "
                "without keys (only on a trusted network)"
            )
        return cls(keys)

    def __len__(self) -> int:
        return len(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries a known bearer key."""
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = False
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(digest, known)
        return found


__all__ = ["AuthError", "KeyRing"]
