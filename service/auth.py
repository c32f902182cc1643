"""API keys with scopes (`read` < `write` < `admin`), sent as `Authorization: Bearer <key>` and compared in
constant time."""

from __future__ import annotations

import hmac

from service.errors import AuthenticationError, PermissionDeniedError


class KeyChecker:
    """Maps a bearer token to its scopes; `enabled=False` lets every request through (development only)."""

    def __init__(self, keys: dict[str, frozenset[str]], enabled: bool = True):
        self._keys = [(key.encode(), scopes) for key, scopes in keys.items()]
        self.enabled = enabled

    def scopes_of(self, authorization: str | None) -> frozenset[str]:
        """Scopes of the request's key; AuthenticationError (401) for a missing or unknown key."""
        if not self.enabled:
            return frozenset({"read", "write", "admin"})
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'", "authorization")
        presented = token.strip().encode()
        found = frozenset()
        for key, scopes in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(presented, key):
                found = scopes
        if not found:
            raise AuthenticationError("invalid API key", "authorization")
        return found

    def require(self, authorization: str | None, scope: str) -> None:
        """401 without a valid key, 403 when the key lacks `scope`."""
        if scope not in self.scopes_of(authorization):
            raise PermissionDeniedError(f"this API key lacks the '{scope}' scope", "authorization")
