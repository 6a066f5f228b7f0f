"""Shared-secret authentication of connections: an HMAC-SHA256 challenge and response.

The accepting side (scheduler, server) opens every connection with a HELLO frame. With a
token it carries a fresh random nonce; the connecting side answers with
HMAC(token, nonce) and the acceptor compares in constant time. Until that succeeds the
acceptor serves nothing and reads frames under tiny limits (see transport). The token
comes from MV_AUTH_TOKEN, or from a file (--auth-token-file, MV_AUTH_TOKEN_FILE).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Optional

from multiverso_py.errors import InvalidArgument

NONCE_BYTES = 32
_CONTEXT = b"multiverso-py auth v1\0"  # a MAC made here means nothing to any other protocol


@dataclass(frozen=True)
class Auth:
    token: bytes

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise InvalidArgument("an auth token must be at least 16 bytes: use e.g. `python -c \"import secrets; "
                                  "print(secrets.token_hex(32))\"`")

    def __repr__(self) -> str:
        return "Auth(token=<hidden>)"  # tokens stay out of logs and tracebacks

    @staticmethod
    def nonce() -> bytes:
        return secrets.token_bytes(NONCE_BYTES)

    def mac(self, nonce: bytes) -> bytes:
        return hmac.new(self.token, _CONTEXT + nonce, hashlib.sha256).digest()

    def check(self, nonce: bytes, mac: object) -> bool:
        return isinstance(mac, bytes) and hmac.compare_digest(self.mac(nonce), mac)


def load_auth(token_file: Optional[str] = None, environ: Optional[dict] = None) -> Optional[Auth]:
    """The job's Auth from a token file, else MV_AUTH_TOKEN_FILE, else MV_AUTH_TOKEN; None
    when none is set (no authentication)."""
    env = os.environ if environ is None else environ
    path = token_file or env.get("MV_AUTH_TOKEN_FILE")
    if path:
        try:
            with open(path, "rb") as f:
                token = f.read().strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read the auth token file {path!r}: {exc.strerror}") from None
        return Auth(token)
    token = env.get("MV_AUTH_TOKEN")
    return Auth(token.encode()) if token else None
