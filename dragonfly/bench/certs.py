"""
A throw-away certificate authority for the TLS runs: one CA, and one leaf
per loopback address naming that address in its subjectAltName (as
C{dragonfly.tls} checks), usable as server and as client certificate.
"""

from pathlib import Path

from dragonfly.bench.common import TLSFiles
from dragonfly.devtools import certs


class Authority:
    """
    A CA written to C{directory/ca.pem}, issuing leaves beside it.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._authority = certs.Authority.create("dfbench CA")
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self._authority.cert_pem)

    def leaf(self, ip: str) -> TLSFiles:
        """
        Issue and write C{leaf-<ip>.pem} and C{.key}, naming C{ip}.
        """
        cert_pem, key_pem = self._authority.issue([ip])
        cert_path = self.directory / f"leaf-{ip}.pem"
        key_path = self.directory / f"leaf-{ip}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        return TLSFiles(cert_path, key_path, self.ca)
