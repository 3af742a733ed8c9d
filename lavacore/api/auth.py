"""Who is calling: HTTP basic ``username:token`` (what lavacli sends from
``http://user:token@host/RPC2``) or ``Authorization: Token TOKEN`` (REST scripts).

No credentials: an anonymous caller, who may read. Credentials that do not match a stored
token: refused (401) on every request, reads included, with the same message whichever
part was wrong. Tokens are stored hashed (lavacore.tokens).
"""

import base64
import binascii
import urllib.parse

from .. import permissions, tokens
from .errors import FORBIDDEN, ApiError, UNAUTHORIZED, unauthorized

REFUSED = "Authentication failed: invalid user name or token."
MAX_CREDENTIAL = 512


class Caller:
    """One request's view of the master: who calls (``user``, None if anonymous) and the
    host name the client used to reach us (``host``, for addresses we hand back). What
    the caller may do is asked of ``policy`` (lavacore/permissions.py), the one place it
    is decided."""

    def __init__(self, master, user=None, host=None, log_reader=None, principal=None):
        self.master = master
        self.user = user
        self.host = host
        self.log_reader = log_reader
        self._principal = principal
        self._policy = None

    @property
    def storage(self):
        return self.master.storage

    def now(self):
        return self.master.clock.time()

    def changed(self):
        """Who may do what changed: the master's cached answers go, a pass may place
        jobs it could not before. API processes sharing the database hear it too (an API
        process's ``permissions_changed`` tells the master and the others itself)."""
        self.master.permissions_changed()
        if getattr(self.master, "role", None) != "api" and _broadcasts(self.storage):
            self.storage.publish_event({"kind": "permissions", "data": {}, "username": None})

    @property
    def principal(self):
        if self._principal is None:
            self._principal = permissions.Principal.load(self.storage, self.user)
        return self._principal

    @property
    def policy(self):
        if self._policy is None:
            self._policy = permissions.Policy(self.storage, self.principal)
        return self._policy

    def require_user(self):
        """The caller's user name; 401 for an anonymous caller."""
        if self.user is None:
            raise unauthorized()
        return self.user

    def require(self, allowed, what="do that"):
        """401 for an anonymous caller, 403 unless ``allowed``; returns the user name.
        ``what`` names only what the caller already named (never what it may not see)."""
        user = self.require_user()
        if not allowed:
            raise ApiError(FORBIDDEN, "Permission denied: you may not %s." % what)
        return user

    def require_admin(self, app, code, what):
        """A superuser, or the model-wide permission ``app.code``."""
        return self.require(self.policy.has_model_perm(app, code), what)

    def require_staff(self, what):
        p = self.principal
        return self.require(p.is_active and (p.is_staff or p.is_superuser), what)


def _broadcasts(storage):
    from ..apiserver import broadcasts

    return broadcasts(storage)


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


def authenticate(storage, header, now=None):
    """The user name for an Authorization header, None for none; ApiError(401) if wrong,
    expired, revoked (checked at every request: a revoked token is refused at once) or
    its user inactive."""
    credentials = parse_authorization(header)
    if credentials is None:
        return None
    username, token = credentials
    if username == "" and token == "":
        return None  # "http://:@host" is no credentials at all
    user = tokens.authenticate(storage, username, token, now)
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


class LocalCaller(Caller):
    """The command line on the master's host: it has the database, so it acts as the
    system (every permission), records the local user name in the audit trail, and tells
    a running master of its changes through the storage's notification channel."""

    def __init__(self, storage, clock, user):
        super().__init__(None, user=user, principal=permissions.SYSTEM)
        self._storage = storage
        self._clock = clock

    @property
    def storage(self):
        return self._storage

    def now(self):
        return self._clock.time()

    def changed(self):
        self._storage.publish_event({"kind": "permissions", "data": {}})
