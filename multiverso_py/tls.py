"""Optional TLS for every connection of a job: encryption and, for the connecting side,
verification of the peer's certificate.

A process that accepts connections (scheduler, server) needs a certificate and its key
(MV_TLS_CERT, MV_TLS_KEY or --tls-cert/--tls-key); a process that connects (worker,
and a server registering with the scheduler) needs the CA that signed them (MV_TLS_CA
or --tls-ca; a self-signed certificate is its own CA). Without them, plain TCP.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Optional

from multiverso_py.errors import InvalidArgument


@dataclass(frozen=True)
class TLS:
    accept: Optional[ssl.SSLContext] = None  # for listening
    connect: Optional[ssl.SSLContext] = None  # for connecting: verifies the peer


def load_tls(cert: Optional[str] = None, key: Optional[str] = None, ca: Optional[str] = None,
             environ: Optional[dict] = None) -> TLS:
    """Contexts from the arguments, else MV_TLS_CERT / MV_TLS_KEY / MV_TLS_CA."""
    env = os.environ if environ is None else environ
    cert, key, ca = cert or env.get("MV_TLS_CERT"), key or env.get("MV_TLS_KEY"), ca or env.get("MV_TLS_CA")
    if bool(cert) != bool(key):
        raise InvalidArgument("TLS needs both a certificate and its key (--tls-cert and --tls-key, "
                              "or MV_TLS_CERT and MV_TLS_KEY)")
    accept = connect = None
    try:
        if cert:
            accept = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            accept.load_cert_chain(cert, key)
        if ca:
            connect = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot set up TLS from cert={cert!r} key={key!r} ca={ca!r}: {exc}") from None
    return TLS(accept, connect)
