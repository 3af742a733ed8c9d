"""Who is calling: HTTP basic ``username:token`` (what lavacli sends from
``http://user:token@host/RPC2``) or ``Authorization: Token TOKEN`` (REST scripts).

No credentials: an anonymous caller, who may read. Credentials that do not match a stored
token: refused (401) on every request, reads included, with the same message whichever
part was wrong. Tokens are stored hashed (lavacore.tokens).
"""

import base64
import binascii
import urllib.parse

from .. import tokens
from .errors import ApiError, UNAUTHORIZED, unauthorized

REFUSED = "Authentication failed: invalid user name or token."
MAX_CREDENTIAL = 512


class Caller:
    """One request's view of the master: who calls (``user``, None if anonymous) and the
    host name the client used to reach us (``host``, for addresses we hand back)."""

    def __init__(self, master, user=None, host=None, log_reader=None):
        self.master = master
        self.user = user
        self.host = host
        self.log_reader = log_reader

    @property
    def storage(self):
        return self.master.storage

    def require_user(self):
        """The caller's user name; 401 for an anonymous caller."""
        if self.user is None:
            raise unauthorized()
        return self.user


def parse_authorization(header):
    """``(username, token)`` from an Authorization header (username is None for the
    Token/Bearer schemes), or None without one. A malformed header is refused."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if not value or len(value) > MAX_CREDENTIAL:
        raise ApiError(UNAUTHORIZED, REFUSED)
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ApiError(UNAUTHORIZED, REFUSED) from None
        username, sep, token = decoded.partition(":")
        if not sep:
            raise ApiError(UNAUTHORIZED, REFUSED)
        # requests sends the URL's user info as given; a client may have quoted it.
        return urllib.parse.unquote(username), urllib.parse.unquote(token)
    if scheme in ("token", "bearer"):
        return None, value
    raise ApiError(UNAUTHORIZED, REFUSED)


def authenticate(storage, header):
    """The user name for an Authorization header, None for none; ApiError(401) if wrong."""
    credentials = parse_authorization(header)
    if credentials is None:
        return None
    username, token = credentials
    if username is None:
        user = storage.token_user(tokens.digest(token)) if token else None
    else:
        if username == "" and token == "":
            return None  # "http://:@host" is no credentials at all
        user = tokens.authenticate(storage, username, token)
    if user is None:
        raise ApiError(UNAUTHORIZED, REFUSED)
    return user


def request_host(environ):
    """The host name (no port) the client used, from the Host header."""
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME") or ""
    try:
        parsed = urllib.parse.urlsplit("//" + host).hostname
    except ValueError:
        return None
    return parsed or None
