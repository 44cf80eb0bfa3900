"""
Option parsing shared by the daemons' C{twistd} plugins and C{dfget}.
"""

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from dragonfly.tls import TLSConfig, TLSConfigError
from dragonfly.units import parse_duration, parse_size


def converted(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """
    Wrap a parser so that a bad value is a usage error naming the option.
    """

    if parse is int:
        parse = integer

    def coerce(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


def size_option(name: str) -> Callable[[str], int]:
    return converted(parse_size, name)


def duration_option(name: str) -> Callable[[str], float]:
    return converted(parse_duration, name)


def integer(text: str) -> int:
    """
    Parse a whole number, with an error that says what was expected.
    """
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def port_number(text: str) -> int:
    value = integer(text)
    if not 0 <= value < 65536:
        raise ValueError(f"{value} is not a port number")
    return value


def ip_address(text: str) -> str:
    """
    Check an IPv4 address (the daemons bind and advertise IPv4).
    """
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def guess_ip() -> str:
    """
    This host's address as its name resolves, or loopback.
    """
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return address


def check_tls_options(options: "usage.Options") -> None:
    """
    The three TLS flags go together: key with certificate, CA only with both.
    """
    cert, key, ca = options["tls-cert"], options["tls-key"], options["tls-ca"]
    if bool(cert) != bool(key):
        raise usage.UsageError("--tls-cert and --tls-key must be given together")
    if ca and not cert:
        raise usage.UsageError("--tls-ca needs --tls-cert and --tls-key")


TLS_PARAMETERS = [
    ["tls-cert", None, "", "PEM certificate: serve (and connect) over TLS."],
    ["tls-key", None, "", "PEM private key of --tls-cert."],
    ["tls-ca", None, "", "PEM CA: require and verify peer certificates (mutual TLS)."],
]

HTTP_TIMEOUT_PARAMETER = [
    "http-timeout",
    None,
    60.0,
    "Close an HTTP connection idle this long, or still sending a request "
    "(headers and body) after this long.",
    duration_option("http-timeout"),
]


def tls_from_options(options: "usage.Options") -> TLSConfig | None:
    """
    The TLS configuration the C{--tls-*} flags name, if any.

    @raise usage.UsageError: if a file cannot be used.
    """
    if not options["tls-cert"]:
        return None
    try:
        tls = TLSConfig.load(options["tls-cert"], options["tls-key"], options["tls-ca"])
    except TLSConfigError as e:
        raise usage.UsageError(str(e)) from None
    if not tls.mutual:
        Logger().warn(
            "TLS without --tls-ca: traffic is encrypted, peers are not authenticated"
        )
    return tls
