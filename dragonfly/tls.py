"""
TLS for the piece protocol and the control API.

With a certificate and key, servers speak TLS.  With a CA as well, both sides
verify: a server asks every client for a certificate signed by the CA and
refuses the handshake without one (mutual TLS), and a client checks that the
server's certificate is signed by the CA and names the address it dialled
(an IP address in the certificate's subjectAltName, checked with
service-identity).  Without a CA the traffic is encrypted but nobody is
authenticated; the daemons log a warning when run that way.
"""

from dataclasses import dataclass
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer


class TLSConfigError(ValueError):
    """
    A certificate, key or CA file could not be used; the message says which.
    """


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path!r}: {e.strerror}") from e


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
        key = self.identity.privateKey.original
        cert = self.identity.original
        if self.authority is None:
            return ssl.CertificateOptions(privateKey=key, certificate=cert)
        return ssl.CertificateOptions(
            privateKey=key,
            certificate=cert,
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
            host, trustRoot=self.authority, clientCertificate=self.identity
        )


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientOptions:
    """
    Encrypt without authenticating the server: used only without a CA.
    """

    def __init__(self, identity: ssl.PrivateCertificate) -> None:
        self._options = ssl.CertificateOptions(
            privateKey=identity.privateKey.original,
            certificate=identity.original,
            verify=False,
        )

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        context = self._options.getContext()
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        return connection
