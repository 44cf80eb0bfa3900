"""
Pieces shared by the command lines (C{dfget} and its C{preheat}
subcommand): argument types that turn a C{ValueError} into argparse's own
usage error, and the TLS flags' checks.
"""

import argparse
from collections.abc import Callable
from typing import Any

from dragonfly.tls import TLSConfig, TLSConfigError


def typed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """
    An argparse C{type} calling C{parse}; its C{ValueError} becomes a usage
    error naming C{what}.
    """

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = what
    return convert


def parse_header(text: str) -> tuple[str, str]:
    """
    C{"Name: value"} as C{(name, value)}.

    @raise ValueError: no colon, or no name.
    """
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"header must be 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def tls_from_args(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> TLSConfig | None:
    """
    The TLS configuration of C{--tls-cert}, C{--tls-key} and C{--tls-ca},
    or None without them; inconsistent or unreadable ones are a usage error.
    """
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        p.error("--tls-ca needs --tls-cert and --tls-key")
    if not args.tls_cert:
        return None
    try:
        return TLSConfig.load(args.tls_cert, args.tls_key, args.tls_ca)
    except TLSConfigError as e:
        p.error(str(e))
