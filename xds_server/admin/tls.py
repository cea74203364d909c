"""TLS for the admin server, with certificate rotation and no restart.

The server's `ssl.SSLContext` is the one aiohttp listens with; its `sni_callback`
runs on every TLS handshake (with or without SNI, before the certificate is sent)
and compares the files' stat signatures (mtime, size, inode) with those loaded.
When they changed, a fresh context is loaded from the files and the connection is
switched to it (`SSLObject.context = ...`, what the callback exists for), so the
handshake that noticed the change already serves the new certificate; so does
every later one. A half-rotated pair (a new certificate, the old key) fails to
load: it is logged and the last good certificate keeps serving until the pair
matches again. Checking costs two stat() calls per handshake.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from xds_server.tls import Signature, file_signature

__all__ = ["AdminTls", "TlsError", "admin_tls"]

log = logging.getLogger(__name__)


class TlsError(Exception):
    """The admin TLS files are unusable; a start-up error that names them."""


def admin_tls(cert: Path | None, key: Path | None) -> AdminTls | None:
    """TLS from a certificate chain file and its key file; None (plain HTTP) without both."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise TlsError(
            "--admin-tls-cert and --admin-tls-key go together: give both (the certificate "
            "chain and its private key, PEM) or neither (plain HTTP)"
        )
    return AdminTls(cert, key)


def _no_password() -> str:
    raise TlsError(
        "the private key is encrypted; give an unencrypted key file (readable by this user only)"
    )


class AdminTls:
    """`context` is for the listening site; it serves the files' current certificate."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.reloads = 0
        self._signature = self._stat()
        self.context = self._load()
        self.context.sni_callback = self._on_hello
        self._current = self.context
        self._refused: Signature | None = None  # files that failed to load: not retried
        self._warned = ""

    def _stat(self) -> Signature:
        try:
            return file_signature((self.cert, self.key))
        except OSError as err:
            raise TlsError(f"admin TLS file {err.filename}: cannot read it: {err}") from err

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key, password=_no_password)
        except TlsError as err:
            raise TlsError(f"admin TLS key {self.key}: {err}") from err
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            raise TlsError(
                f"admin TLS: cannot use certificate {self.cert} with key {self.key}: {err}"
            ) from err
        return context

    def refresh(self) -> ssl.SSLContext:
        """The context of the files as they are now: reloaded if they changed since, else the
        last good one (also when they changed into something unusable, which is logged)."""
        try:
            signature = self._stat()
            if signature not in (self._signature, self._refused):
                self._refused = signature  # until it loads: one attempt per change
                self._current = self._load()
                self._signature, self._refused = signature, None
                self.reloads += 1
                log.info("admin TLS: serving the new certificate from %s", self.cert)
        except TlsError as err:
            if str(err) != self._warned:  # once per problem, not once per handshake
                self._warned = str(err)
                log.warning("admin TLS: keeping the certificate loaded before: %s", err)
        else:
            self._warned = ""
        return self._current

    def _on_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None, _: object
    ) -> None:
        try:
            current = self.refresh()
            if current is not self.context:
                connection.context = current
        except Exception:  # never fail a handshake over the check itself
            log.exception("admin TLS: checking the certificate files failed")
