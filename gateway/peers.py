"""Registry of remote DICOM application entities (PACS, modalities, workstations).

A peer is an AE title bound to the host it calls from and listens on. Because AE
titles are trivially spoofed, an association is accepted only when its calling AE
title is registered *and* comes from the registered host (name resolved to its
addresses). The registry lives in the index database so every gateway process and
the CLI share it; lookups are cached for a few seconds per process.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from gateway.archive.db import Database
from gateway.archive.errors import IndexUnavailable
from gateway.archive.models import Peer as PeerRow
from gateway.archive.models import utcnow


class PeerError(ValueError):
    """A peer cannot be added or found as asked."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    institution: str = ""
    issuer: str = ""
    description: str = ""
    # Associations we open to it speak DICOM TLS (gateway.dimse.client).
    tls: bool = False
    tls_ca_file: str = ""
    tls_server_name: str = ""


def validate_ae_title(value: str) -> str:
    title = value.strip()
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        raise PeerError("an AE title is 1 to 16 printable characters, without backslash")
    return title


class PeerRegistry:
    def __init__(self, db: Database, cache_seconds: float = 5.0) -> None:
        self.db = db
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Peer | None]] = {}
        self._addresses: dict[str, tuple[float, set[str]]] = {}

    def add(
        self,
        ae_title: str,
        host: str,
        port: int,
        *,
        institution: str = "",
        issuer: str = "",
        description: str = "",
        tls: bool = False,
        tls_ca_file: str = "",
        tls_server_name: str = "",
    ) -> Peer:
        title = validate_ae_title(ae_title)
        if not host.strip():
            raise PeerError("a peer needs a host")
        if not 0 < port < 65536:
            raise PeerError("port must be between 1 and 65535")
        if (tls_ca_file or tls_server_name) and not tls:
            raise PeerError("--tls-ca-file and --tls-server-name need --tls")
        if tls_ca_file and not Path(tls_ca_file).is_file():
            raise PeerError(f"CA file {tls_ca_file} does not exist")
        peer = Peer(
            title,
            host.strip(),
            port,
            institution,
            issuer,
            description,
            tls,
            str(Path(tls_ca_file).resolve()) if tls_ca_file else "",
            tls_server_name.strip(),
        )
        try:
            with self.db.writing() as session:
                session.add(PeerRow(**asdict(peer), created_at=utcnow()))
        except IntegrityError as exc:
            raise PeerError(f"peer {title} is already registered") from exc
        self._cache.pop(title, None)
        return peer

    def remove(self, ae_title: str) -> bool:
        with self.db.writing() as session:
            result = session.execute(delete(PeerRow).where(PeerRow.ae_title == ae_title.strip()))
        self._cache.pop(ae_title.strip(), None)
        return bool(result.rowcount)

    def list(self) -> list[Peer]:
        with self.db.reading() as session:
            rows = session.scalars(select(PeerRow).order_by(PeerRow.ae_title)).all()
        return [_to_peer(row) for row in rows]

    def get(self, ae_title: str) -> Peer | None:
        title = ae_title.strip()
        now = time.monotonic()
        cached = self._cache.get(title)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        try:
            with self.db.reading() as session:
                row = session.scalar(select(PeerRow).where(PeerRow.ae_title == title))
        except (OperationalError, InterfaceError) as exc:
            # The index is away: a retryable failure for the caller, never "unknown".
            raise IndexUnavailable(f"peer registry unavailable: {exc.__class__.__name__}") from exc
        peer = _to_peer(row) if row is not None else None
        self._cache[title] = (now, peer)
        return peer

    def host_matches(self, peer: Peer, address: str) -> bool:
        """Whether a connection from ``address`` may act as ``peer``."""
        return _normalise(address) in self._resolve(peer.host)

    def _resolve(self, host: str) -> set[str]:
        now = time.monotonic()
        cached = self._addresses.get(host)
        if cached is not None and now - cached[0] < 60:
            return cached[1]
        try:
            ipaddress.ip_address(host)
            addresses = {_normalise(host)}
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, None)
                addresses = {_normalise(str(info[4][0])) for info in infos}
            except OSError:
                addresses = set()
        self._addresses[host] = (now, addresses)
        return addresses


def _normalise(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _to_peer(row: PeerRow) -> Peer:
    return Peer(
        ae_title=row.ae_title,
        host=row.host,
        port=row.port,
        institution=row.institution,
        issuer=row.issuer,
        description=row.description,
        tls=row.tls,
        tls_ca_file=row.tls_ca_file,
        tls_server_name=row.tls_server_name,
    )
