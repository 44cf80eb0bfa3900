"""
Registry token authentication (the distribution spec's Bearer flow), shared
by dfpeer's mirror and the supernode's image preheat.

A registry that wants a token answers C{401} with
C{WWW-Authenticate: Bearer realm="...",service="...",scope="..."}; the
client asks the realm for a token for C{repository:<name>:pull} and sends
it as C{Authorization: Bearer <token>}.  Only pull tokens are asked for:
neither caller ever writes to a registry.  Credentials given by the user
(C{Basic ...}) are passed to the realm, which is how a registry trades them
for a token; without them the token is anonymous.
"""

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from dragonfly.http import read_bounded
from dragonfly.tasks import InvalidRequest, check_url

MAX_TOKEN_REPLY = 1 << 20
# What the distribution token spec says a token without C{expires_in} lasts.
DEFAULT_TOKEN_LIFETIME = 60


@dataclass(frozen=True)
class Token:
    """
    A token from a realm, and how many seconds it is valid from when it was
    issued.
    """

    value: str
    expires_in: int = DEFAULT_TOKEN_LIFETIME


class TokenError(Exception):
    """
    The realm did not give a token.
    """


def parse_challenge(value: str) -> dict[str, str]:
    """
    The parameters of a C{Bearer realm="...",service="...",scope="..."}
    challenge (empty if it is not a Bearer challenge).
    """
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "bearer":
        return {}
    return {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}


def bearer_challenge(headers: Headers) -> dict[str, str]:
    """
    The Bearer challenge among a response's C{WWW-Authenticate} headers
    (empty when there is none, or it names no realm).
    """
    for value in headers.getRawHeaders(b"www-authenticate", []):
        challenge = parse_challenge(value.decode("latin-1"))
        if challenge.get("realm"):
            return challenge
    return {}


def pull_scope(name: str) -> str:
    return f"repository:{name}:pull"


async def request_token(
    http: Any,
    challenge: dict[str, str],
    scope: str,
    *,
    timeout: float,
    authorization: str = "",
) -> Token:
    """
    Ask the challenge's realm for a token for C{scope}.

    @param http: a treq client.
    @param authorization: the user's own C{Authorization} value, passed to
        the realm when it is not itself a Bearer token.
    @return: the token, with its lifetime.
    @raise TokenError: the realm is not an http(s) URL, refused, or sent
        no token.
    """
    realm = challenge.get("realm", "")
    try:
        check_url(realm)
    except InvalidRequest as e:
        raise TokenError(f"bad token realm: {e}") from e
    params = {"scope": scope}
    if challenge.get("service"):
        params["service"] = challenge["service"]
    url = realm + ("&" if "?" in realm else "?") + urlencode(params)
    headers = Headers()
    if authorization and not authorization.lower().startswith("bearer "):
        headers.setRawHeaders(b"authorization", [authorization.encode("latin-1")])
    response: IResponse = await http.get(url, headers=headers, timeout=timeout)
    raw = await read_bounded(response, MAX_TOKEN_REPLY)
    if response.code != 200:
        raise TokenError(f"token realm {realm} answered HTTP {response.code}")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise TokenError(f"token realm {realm} sent no JSON") from e
    token = ""
    expires_in: Any = None
    if isinstance(body, dict):
        token = body.get("token") or body.get("access_token") or ""
        expires_in = body.get("expires_in")
    if not isinstance(token, str) or not token:
        raise TokenError(f"token realm {realm} sent no token")
    if isinstance(expires_in, int) and not isinstance(expires_in, bool):
        return Token(token, max(0, expires_in))
    return Token(token)
