"""
Certificates for loopback TLS setups (tests, benchmarks, trying mutual TLS
out): a certificate authority and leaf certificates naming IP addresses.

Generated with C{cryptography} (ECDSA P-256, fast to make), valid from an hour
ago for a day.  Leaves carry both the serverAuth and the clientAuth extended
key usages, since every Dragonfly node is both a TLS server and a client::

    ca = Authority.create("test CA")
    cert_pem, key_pem = ca.issue(["127.0.0.2"])
"""

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "small-dragonfly tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Authority:
    """
    A self-signed CA that can issue leaf certificates.
    """

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> "Authority":
        key = _key()
        public = key.public_key()
        builder = (
            _validity(x509.CertificateBuilder())
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public), critical=False
            )
        )
        return cls(name, key, builder.sign(key, hashes.SHA256()))

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue_objects(
        self, ips: Iterable[str], common_name: str = "", dns: Iterable[str] = ()
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """
        A leaf certificate naming C{ips} (and C{dns} names) in its
        subjectAltName, and its key.
        """
        ips = list(ips)
        dns = list(dns)
        key = _key()
        public = key.public_key()
        alt_names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips
        ]
        alt_names += [x509.DNSName(d) for d in dns]
        builder = (
            _validity(x509.CertificateBuilder())
            .subject_name(_name(common_name or (ips[0] if ips else "leaf")))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()
                ),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(alt_names), critical=False
            )
        return builder.sign(self.key, hashes.SHA256()), key

    def issue(
        self, ips: Iterable[str], common_name: str = "", dns: Iterable[str] = ()
    ) -> tuple[bytes, bytes]:
        """
        Like L{issue_objects}, as PEM: C{(certificate, private key)}.
        """
        cert, key = self.issue_objects(ips, common_name, dns)
        return cert_pem(cert), key_pem(key)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """
        Write this CA's certificate and key as C{stem.pem} and C{stem.key}.
        """
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(key_pem(self.key))
        key_path.chmod(0o600)
        return cert_path, key_path
