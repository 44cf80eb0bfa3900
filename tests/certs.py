"""
Test PKI: a certificate authority, leaf certificates with IP subjectAltNames,
and a second, untrusted ("rogue") authority with leaves of its own.

Everything is generated with C{cryptography} (ECDSA P-256, fast to make) and
valid from an hour ago for a day.  Leaves carry both the serverAuth and the
clientAuth extended key usages, since every Dragonfly node is both a TLS
server and a TLS client.

In memory::

    ca = Authority.create("test CA")
    cert_pem, key_pem = ca.issue(["127.0.0.2"])

On disk::

    pki = make_pki(tmp_path)            # CA + leaves for 127.0.0.1..4
    pki.ca                              # Path of the trusted CA certificate
    pki.leaf("127.0.0.2").cert/.key     # Paths of a leaf naming 127.0.0.2
    pki.rogue_ca, pki.rogue_leaf("127.0.0.2")
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dragonfly.devtools.certs import Authority, cert_pem, key_pem

__all__ = [
    "PKI",
    "Authority",
    "CertPair",
    "cert_pem",
    "key_pem",
    "make_pki",
    "write_leaf",
]

DEFAULT_IPS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")


@dataclass(frozen=True)
class CertPair:
    """
    Paths of a leaf certificate and its key, and the IPs it names.
    """

    cert: Path
    key: Path
    ips: tuple[str, ...]


def write_leaf(
    authority: Authority,
    directory: Path,
    stem: str,
    ips: Iterable[str],
    dns: Iterable[str] = (),
) -> CertPair:
    """
    Issue a leaf from C{authority} and write it as C{stem.pem}/C{stem.key}.
    """
    ips = tuple(ips)
    cert, key = authority.issue(ips, stem, dns)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    key_path.chmod(0o600)
    return CertPair(cert_path, key_path, ips)


@dataclass
class PKI:
    """
    A trusted CA with one leaf per IP, and an untrusted CA with the same.
    """

    directory: Path
    authority: Authority
    rogue_authority: Authority
    ca: Path
    ca_key: Path
    rogue_ca: Path
    rogue_ca_key: Path
    leaves: dict[str, CertPair] = field(default_factory=dict)
    rogue_leaves: dict[str, CertPair] = field(default_factory=dict)

    def leaf(self, ip: str) -> CertPair:
        """
        The trusted leaf naming C{ip} (issued on first use for a new IP).
        """
        if ip not in self.leaves:
            self.leaves[ip] = write_leaf(
                self.authority, self.directory, f"leaf-{ip}", [ip]
            )
        return self.leaves[ip]

    def rogue_leaf(self, ip: str) -> CertPair:
        """
        A leaf naming C{ip} signed by the untrusted CA.
        """
        if ip not in self.rogue_leaves:
            self.rogue_leaves[ip] = write_leaf(
                self.rogue_authority, self.directory, f"rogue-leaf-{ip}", [ip]
            )
        return self.rogue_leaves[ip]


def make_pki(directory: Path, ips: Iterable[str] = DEFAULT_IPS) -> PKI:
    """
    Generate the test PKI into C{directory} (created if needed).

    Files: C{ca.pem}/C{ca.key}, C{leaf-<ip>.pem}/C{.key} for each of C{ips},
    C{rogue-ca.pem}/C{rogue-ca.key} and C{rogue-leaf-<ip>.pem}/C{.key} for
    each of C{ips}.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    authority = Authority.create("small-dragonfly test CA")
    rogue = Authority.create("small-dragonfly ROGUE CA")
    ca, ca_key = authority.write(directory, "ca")
    rogue_ca, rogue_ca_key = rogue.write(directory, "rogue-ca")
    pki = PKI(directory, authority, rogue, ca, ca_key, rogue_ca, rogue_ca_key)
    for ip in ips:
        pki.leaf(ip)
        pki.rogue_leaf(ip)
    return pki
