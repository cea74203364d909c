"""TLS and mTLS for the gRPC ports (xDS + LRS, the body router), with rotation from files.

Certificates in a fleet are short-lived and rotated in place (cert-manager, SPIRE write new
files over the old ones), so the files are re-read on every TLS handshake whose files have
changed since the last one: gRPC asks `_fetch` for the current configuration at each new
connection, and open connections keep the certificate they negotiated. A half-written or
unreadable set of files is logged and the last good one keeps serving.

With a client CA, client certificates are required and verified against it, and the
node's identity is its certificate's SPIFFE URI SAN (else its URI and DNS SANs): see
`peer_identities`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

import grpc

__all__ = [
    "ServerTls",
    "Signature",
    "TlsFiles",
    "TlsFilesError",
    "file_signature",
    "identity_allowed",
    "peer_identities",
]

log = logging.getLogger(__name__)


class TlsFilesError(ValueError):
    """The certificate, key or CA file cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where a server's certificate chain, key and (for mTLS) client CA bundle live."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        ca = () if self.client_ca is None else (self.client_ca,)
        return (self.cert, self.key, *ca)


#: Per file (mtime, size, inode, device): what changes when a file is rewritten or replaced.
Signature = tuple[tuple[int, int, int, int], ...]


def file_signature(paths: Sequence[Path]) -> Signature:
    """How the files stand now, cheaply (stat only); OSError naming the file that is missing.
    Rotation checks of the gRPC and admin TLS files compare these."""
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino, s.st_dev) for s in map(os.stat, paths))


def _fingerprint(paths: Sequence[Path]) -> Signature | None:
    try:
        return file_signature(paths)
    except OSError:
        return None


def _read(files: TlsFiles) -> tuple[bytes, bytes, bytes | None]:
    """The three files' bytes, checked enough that a half-written file is refused."""
    contents: list[bytes] = []
    for path, marker in ((files.cert, b"CERTIFICATE"), (files.key, b"PRIVATE KEY")):
        try:
            data = path.read_bytes()
        except OSError as err:
            raise TlsFilesError(f"cannot read {path}: {err.strerror}") from err
        if b"-----BEGIN" not in data or marker not in data or b"-----END" not in data:
            raise TlsFilesError(f"{path} holds no PEM {marker.decode().lower()}")
        contents.append(data)
    ca = None
    if files.client_ca is not None:
        try:
            ca = files.client_ca.read_bytes()
        except OSError as err:
            raise TlsFilesError(f"cannot read {files.client_ca}: {err.strerror}") from err
        if b"-----BEGIN CERTIFICATE" not in ca or b"-----END CERTIFICATE" not in ca:
            raise TlsFilesError(f"{files.client_ca} holds no PEM certificate")
    return contents[0], contents[1], ca


class ServerTls:
    """gRPC server credentials that follow the files: `credentials()` for add_secure_port."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.reloads = 0  # times new files were taken (not counting the first read)
        self.reload_failures = 0  # times changed files could not be used
        cert, key, ca = _read(files)  # start-up: unusable files are an error, not a log line
        self._seen = _fingerprint(files.paths)
        self._initial = self._configuration(cert, key, ca)

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate signed by the client CA."""
        return self.files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )

    @staticmethod
    def _configuration(
        cert: bytes, key: bytes, ca: bytes | None
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: new configuration if the files changed."""
        seen = _fingerprint(self.files.paths)
        if seen is None or seen == self._seen:
            return None
        try:
            cert, key, ca = _read(self.files)
        except TlsFilesError as err:
            self.reload_failures += 1
            log.error("TLS files changed but cannot be used, keeping the previous ones: %s", err)
            return None
        self._seen = seen
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return self._configuration(cert, key, ca)


class _HasAuthContext(Protocol):
    def auth_context(self) -> Mapping[str, Sequence[bytes]]: ...


def peer_identities(context: _HasAuthContext) -> tuple[str, ...] | None:
    """The authenticated identities of a call's client certificate, most specific first:
    the SPIFFE ID, then the other URI SANs, then the DNS SANs. None when the connection
    carries no verified client certificate (plaintext, or TLS without a client CA)."""
    auth = context.auth_context()
    if not auth.get("x509_pem_cert"):
        return None
    names: list[str] = []
    for key in ("peer_spiffe_id", "peer_uri", "peer_dns"):
        for value in auth.get(key, ()):
            name = value.decode(errors="replace")
            if name not in names:
                names.append(name)
    return tuple(names)


def identity_allowed(patterns: Sequence[str], identities: Sequence[str]) -> bool:
    """Whether any identity matches any pattern (shell-style: `spiffe://example.org/ns/edge/*`).

    `*` also matches `/`, so a pattern names a subtree; an empty pattern list admits
    every authenticated client (the CA vouches for it)."""
    return not patterns or any(fnmatchcase(i, p) for p in patterns for i in identities)
