"""Browser sessions and CSRF tokens for the web pages.

A person logs in with a user name and an API token (what lavacli uses). The session is a
signed cookie, not server memory, so every master or API process sharing the database
accepts it: ``user, token id, issued, expires`` and an HMAC-SHA256 made with a secret kept
in the database (the blob ``web/session-secret``, made once by whichever process needs it
first). At every request the session is checked again against the database: the token it
was opened with must still exist (not revoked) and not be expired, its user must be active,
and the user must not have logged out since the session was issued (logging out ends the
user's sessions in every browser: the time is kept in the blob ``web-logout/USER``).

CSRF: every form that changes something carries ``csrf``, an HMAC of the random value of
the ``lavacore_csrf`` cookie; a request whose cookie and field do not match is refused.
An attacker's page can neither read the cookie nor compute the HMAC without the secret.

Both cookies are HttpOnly and SameSite=Lax: a browser sends them when a person follows a
link to the site from elsewhere (a CI dashboard, a mail), so the page opened is the one a
logged-in user expects, and never with a request another site's page makes by itself
(its forms' POSTs, its images and scripts). Strict would keep the session out of such a
link's page ("not found" for a private job) and gain nothing: what changes something is a
POST, checked against the CSRF token and ``Origin`` (pages.Request.form). The CSRF cookie
is Lax for the same reason: with Strict, a page opened from a link would not see it and
would set a new one, and the forms of the user's other tabs would stop working.
With ``[api] public_url`` at an https address, both are ``Secure`` too.
"""

import base64
import hashlib
import hmac
import json
import re
import secrets

from ..storage import NotFound

SESSION_COOKIE = "lavacore_session"
CSRF_COOKIE = "lavacore_csrf"
SESSION_AGE = 12 * 3600          # seconds; never past the token's own expiry
CSRF_AGE = 7 * 24 * 3600
MAX_COOKIE = 1024
_CSRF_VALUE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_cookies(header):
    """{name: [values, in the order sent]} of a Cookie header. Tolerant of what other
    sites on the same host (cookies ignore ports) may have set: a malformed pair is
    skipped, never the whole header."""
    found = {}
    for part in (header or "")[:8192].split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            found.setdefault(name, []).append(value.strip().strip('"'))
    return found


def cookie(name, value, max_age, secure=False):
    """A Set-Cookie value (``max_age`` 0 removes the cookie). Lax, not Strict: see the
    module's description (a GET changes nothing; POSTs are checked for CSRF)."""
    text = "%s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax" % (name, value, max_age)
    return text + "; Secure" if secure else text


class Sessions:
    """Issues and checks the session and CSRF values of one storage."""

    def __init__(self, storage):
        self.storage = storage
        self._secret = None

    def secret(self):
        if self._secret is None:
            stored = self.storage.blob_default("web", "session-secret", secrets.token_hex(32))
            self._secret = bytes.fromhex(stored)
        return self._secret

    def _sign(self, purpose, text):
        return hmac.new(self.secret(), ("%s:%s" % (purpose, text)).encode("utf-8"),
                        hashlib.sha256).digest()

    # -- sessions -------------------------------------------------------------------------

    def issue(self, username, token_id, now, token_expires=None):
        """(cookie value, max age) of a new session of ``username``, opened with the token
        ``token_id``."""
        expires = now + SESSION_AGE
        if token_expires is not None:
            expires = min(expires, token_expires)
        payload = _b64(json.dumps({"u": username, "t": int(token_id), "i": now,
                                   "e": expires}, separators=(",", ":")).encode("utf-8"))
        return "%s.%s" % (payload, _b64(self._sign("session", payload))), \
            max(0, int(expires - now))

    def user(self, values, now):
        """The user of the first valid session among cookie ``values``, or None."""
        for value in values:
            username = self._check(value, now)
            if username is not None:
                return username
        return None

    def _check(self, value, now):
        if not value or len(value) > MAX_COOKIE or value.count(".") != 1:
            return None
        payload, _, signature = value.partition(".")
        try:
            given = _unb64(signature)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._sign("session", payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            username, token_id = str(data["u"]), int(data["t"])
            issued, expires = float(data["i"]), float(data["e"])
        except (ValueError, KeyError, TypeError):
            return None
        if now >= expires:
            return None
        return username if self.still_valid(username, token_id, issued, now) else None

    def still_valid(self, username, token_id, issued, now):
        """What tokens.authenticate checks of a token, by its id (the session holds no
        token), and that its user did not log out since ``issued``."""
        try:
            token = self.storage.get_token(token_id)
        except NotFound:
            return False  # revoked
        if token["username"] != username:
            return False
        if token["expires"] is not None and now >= token["expires"]:
            return False
        try:
            if not self.storage.get_user(username).is_active:
                return False
        except NotFound:
            return False
        logged_out = self.storage.get_blob("web-logout", username)
        try:
            return logged_out is None or issued > float(logged_out)
        except ValueError:
            return False

    def logout(self, username, now):
        """End every session of ``username`` issued until now."""
        self.storage.set_blob("web-logout", username, repr(now))

    # -- CSRF -------------------------------------------------------------------------------

    @staticmethod
    def csrf_seed(values):
        """The CSRF cookie's value if one of ``values`` is well formed, else None."""
        for value in values:
            if _CSRF_VALUE.match(value):
                return value
        return None

    @staticmethod
    def new_csrf_seed():
        return secrets.token_urlsafe(32)

    def csrf_token(self, seed):
        return _b64(self._sign("csrf", seed))

    def csrf_ok(self, seed, token):
        if not seed or not isinstance(token, str) or len(token) > 100:
            return False
        return hmac.compare_digest(token.encode("ascii", "replace"),
                                   self.csrf_token(seed).encode("ascii"))
