"""
TLS for the piece protocol and the control API.

With a certificate and key, servers speak TLS.  With a CA as well, both sides
verify: a server asks every client for a certificate signed by the CA and
refuses the handshake without one (mutual TLS), and a client checks that the
server's certificate is signed by the CA and names the address it dialled
(an IP address in the certificate's subjectAltName, checked with
service-identity).  Without a CA the traffic is encrypted but nobody is
authenticated; the daemons log a warning when run that way.

Piece connections move hundreds of MiB a second, so they run over
L{BulkTLSTransport} (L{TLSConfig.wrap_server}, L{TLSConfig.wrap_client}): the
same TLS as Twisted's, moved in bulk.  Twisted's TLS layer passes the
protocol one TLS record (at most 16 KiB) per callback and hands TCP one
record per write: 65,536 rounds of Python per GiB on each side, which at
loopback speed cost more than the encryption.  Certificates, verification,
shutdown, producers and buffering before the handshake are Twisted's, and so
are the bytes on the wire; only how many records go up or down per call
changes.  The standard library's C{ssl.SSLObject}, which decrypts straight
into a caller's buffer, was measured as an alternative and rejected: over
memory BIOs it decrypted and hashed 256 MiB no faster than pyOpenSSL
(1,195 against 1,258-1,303 MiB/s), and it would have meant a TLS transport
of our own.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

RECEIVE_BATCH = 1024 * 1024
"""
Plaintext handed to the protocol in one C{dataReceived}, at most (a read
from TCP is at most 1 MiB on piece connections, so usually all of it).
"""

SEND_BATCH = 1024 * 1024
"""
Ciphertext taken from OpenSSL in one piece and written to TCP, at most.
"""


class TLSConfigError(ValueError):
    """
    A certificate, key or CA file could not be used; the message says which.
    """


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path!r}: {e.strerror}") from e


def _own_certificate(identity: ssl.PrivateCertificate) -> dict[str, Any]:
    """
    The C{privateKey} and C{certificate} arguments of L{ssl.CertificateOptions}
    for C{identity}, as C{cryptography} objects.

    Twisted passes them on to pyOpenSSL, which deprecated its own key and
    certificate types there (a warning per context); Twisted's annotations
    still name the old types, hence the untyped dictionary.
    """
    return {
        "privateKey": identity.privateKey.original.to_cryptography_key(),
        "certificate": identity.original.to_cryptography(),
    }


@dataclass(frozen=True)
class TLSConfig:
    """
    This side's certificate and key, and the CA that peers must be signed by.
    """

    identity: ssl.PrivateCertificate
    authority: ssl.Certificate | None

    @classmethod
    def load(cls, cert_path: str, key_path: str, ca_path: str = "") -> "TLSConfig":
        """
        Load PEM files.

        @raise TLSConfigError: if a file is missing or is not what it should be.
        """
        cert_pem = _read(cert_path, "certificate")
        key_pem = _read(key_path, "private key")
        try:
            identity = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        except Exception as e:
            raise TLSConfigError(
                f"{cert_path!r} and {key_path!r} are not a PEM certificate and "
                f"its private key: {e}"
            ) from e
        authority = None
        if ca_path:
            try:
                authority = ssl.Certificate.loadPEM(_read(ca_path, "CA certificate"))
            except TLSConfigError:
                raise
            except Exception as e:
                raise TLSConfigError(
                    f"{ca_path!r} is not a PEM CA certificate: {e}"
                ) from e
        return cls(identity, authority)

    @property
    def mutual(self) -> bool:
        """
        Whether peers are authenticated (a CA is configured).
        """
        return self.authority is not None

    def server_options(self) -> ssl.CertificateOptions:
        """
        Options for a listening port; with a CA, client certificates are
        required and checked.
        """
        own = _own_certificate(self.identity)
        if self.authority is None:
            return ssl.CertificateOptions(**own)
        return ssl.CertificateOptions(
            **own,
            verify=True,
            caCerts=[self.authority.original],
            requireCertificate=True,
        )

    def client_options(self, host: str) -> IOpenSSLClientConnectionCreator:
        """
        Options to connect to C{host}, presenting this side's certificate.
        """
        if self.authority is None:
            return _UnverifiedClientOptions(self.identity)
        return ssl.optionsForClientTLS(
            host,
            trustRoot=self.authority,
            extraCertificateOptions=_own_certificate(self.identity),
        )

    def wrap_server(
        self, factory: IProtocolFactory, clock: IReactorTime
    ) -> TLSMemoryBIOFactory:
        """
        C{factory} behind TLS with L{server_options}, over L{BulkTLSTransport};
        listen with it on a plain TCP endpoint.
        """
        return BulkTLSFactory(self.server_options(), False, factory, clock)

    def wrap_client(
        self, host: str, factory: IProtocolFactory, clock: IReactorTime
    ) -> TLSMemoryBIOFactory:
        """
        C{factory} behind TLS with L{client_options} for C{host}, over
        L{BulkTLSTransport}; connect with it on a plain TCP endpoint.
        """
        return BulkTLSFactory(self.client_options(host), True, factory, clock)


class BulkTLSTransport(BufferingTLSTransport):
    """
    Twisted's TLS transport, passing records up and down in bulk.

    Receiving, every record that one read from TCP completes is decrypted
    first and the protocol gets them in one C{dataReceived} (at most
    L{RECEIVE_BATCH}), before a close or an error is reported, as Twisted
    does it record by record.  Sending, one write goes to OpenSSL whole
    (OpenSSL cuts it into records) and its ciphertext to TCP in one write,
    instead of 16 KiB at a time.

    This overrides three private methods of L{TLSMemoryBIOProtocol}
    (C{_flushReceiveBIO}, C{_write}, C{_flushSendBIO}) and uses its private
    state; each is Twisted's own loop with a different batch size, kept as
    close to it as that allows.  C{tests/test_tls_transport.py} fails if a
    Twisted upgrade renames them or stops calling them (the batches would
    be 16 KiB again).
    """

    # Twisted's methods here are untyped; so is the pyOpenSSL connection.
    _tlsConnection: Any

    def _flushReceiveBIO(self) -> None:
        parts: list[bytes] = []
        size = 0
        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(2**15)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # The peer closed TLS: what came before the close goes first.
                parts = self._deliver(parts)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                parts = self._deliver(parts)
                self._tlsShutdownFinished(Failure())
            else:
                parts.append(data)
                size += len(data)
                if size >= RECEIVE_BATCH:
                    parts, size = self._deliver(parts), 0
        self._deliver(parts)
        # As Twisted does: what was received may call for an answer (a
        # handshake message, a key update).
        self._flushSendBIO()

    def _deliver(self, parts: list[bytes]) -> list[bytes]:
        """
        Pass the decrypted C{parts} to the protocol as one string, unless
        the connection was aborted meanwhile; return a new, empty list.
        """
        if parts and not self._aborted:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            ProtocolWrapper.dataReceived(self, data)
        return []

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += self._tlsConnection.send(view[sent:])
            except SSL.WantReadError:
                # Not before the handshake is done: Twisted keeps the rest
                # and writes it when data arrives.
                self._flushSendBIO()
                self._bufferedWrite(bytes(view[sent:]))
                return
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
                return
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        while True:
            try:
                data = self._tlsConnection.bio_read(SEND_BATCH)
            except SSL.WantReadError:
                return
            self.transport.write(data)  # type: ignore[union-attr]


class BulkTLSFactory(TLSMemoryBIOFactory):
    """
    L{TLSMemoryBIOFactory} building L{BulkTLSTransport}s.
    """

    protocol = BulkTLSTransport


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientOptions:
    """
    Encrypt without authenticating the server: used only without a CA.
    """

    def __init__(self, identity: ssl.PrivateCertificate) -> None:
        self._options = ssl.CertificateOptions(
            **_own_certificate(identity), verify=False
        )

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        context = self._options.getContext()
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        return connection
