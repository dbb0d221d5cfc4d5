"""TLS termination: certificates chosen by SNI, reloaded on SIGHUP without dropping connections.

A sandbox platform serves ``*.{domain}`` with a wildcard certificate (RFC 6125 §6.4.3: the ``*``
covers exactly one label, which is what ``{port}-{id}.{domain}`` is). Several certificates can be
configured (``tls_certificates``, ``CERT:KEY`` pairs): the client's SNI name picks the one whose
subjectAltName matches, the first is the default (also for clients without SNI).

The listener's SSLContext never changes; its ``sni_callback`` hands each new handshake the current
per-certificate context. :meth:`TlsCertificates.reload` builds new contexts from the files and
swaps them in at once, so a renewed certificate is served to new connections while established
ones keep theirs; if the new files are broken the old ones stay (and the error is logged).
ALPN offers ``h2`` then ``http/1.1`` when ``http2`` is on (RFC 9113 §3.2: browsers use HTTP/2 only
when TLS negotiates it), else only ``http/1.1``.
"""

from __future__ import annotations

import ssl
from typing import Any

__all__ = ["TlsCertificates", "names_of"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def names_of(cert_file: str) -> list[str]:
    """The DNS names a certificate is for (subjectAltName, else the subject's CN), lower case."""
    try:
        info: dict[str, Any] = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError, AttributeError):
        return []
    sans = [v.lower() for k, v in info.get("subjectAltName", ()) if k == "DNS"]
    if sans:
        return sans
    return [v.lower() for rdn in info.get("subject", ()) for k, v in rdn if k == "commonName"]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


class TlsCertificates:
    def __init__(self, pairs: tuple[str, ...], min_version: str = "1.2", http2: bool = False) -> None:
        self.pairs = pairs
        self.alpn = ["h2", "http/1.1"] if http2 else ["http/1.1"]
        self.min_version = _VERSIONS[min_version]
        self._contexts: list[tuple[list[str], ssl.SSLContext]] = self._load()
        self._listener: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version
        ctx.set_alpn_protocols(self.alpn)
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        return ctx

    def _load(self) -> list[tuple[list[str], ssl.SSLContext]]:
        out = []
        for pair in self.pairs:
            cert, _, key = pair.partition(":")
            ctx = self._context()
            ctx.load_cert_chain(cert, key)  # raises OSError / ssl.SSLError (a ValueError-like)
            out.append((names_of(cert), ctx))
        if not out:
            raise ValueError("no TLS certificates configured")
        return out

    def reload(self) -> None:
        """Load the files again; on any error the previous certificates stay in use."""
        try:
            contexts = self._load()
        except ssl.SSLError as e:
            raise ValueError(str(e)) from None
        self._contexts = contexts  # one assignment: a handshake sees the old set or the new
        if self._listener is not None:  # clients without SNI get the listener's own certificate
            cert, _, key = self.pairs[0].partition(":")
            self._listener.load_cert_chain(cert, key)

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        contexts = self._contexts
        if server_name:
            name = server_name.lower().rstrip(".")
            for names, ctx in contexts:
                if any(_matches(p, name) for p in names):
                    return ctx
        return contexts[0][1]

    def _sni(self, obj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        obj.context = self.pick(server_name)

    def listener_context(self) -> ssl.SSLContext:
        """The context a TLS listener is created with (its certificate is the default's)."""
        if self._listener is None:
            ctx = self._context()
            cert, _, key = self.pairs[0].partition(":")
            ctx.load_cert_chain(cert, key)
            ctx.sni_callback = self._sni
            self._listener = ctx
        return self._listener
