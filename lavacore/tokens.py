"""API tokens: random, URL-safe (lavacli puts them in the URL), stored only as a hash."""

import hashlib
import hmac
import secrets
import string

ALPHABET = string.ascii_letters + string.digits
LENGTH = 40


def digest(token):
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create(storage, username, description, now):
    """Make a token for ``username``, store its hash and return the token (shown once)."""
    if not username or any(c.isspace() or c in ":@/" for c in username):
        raise ValueError("invalid user name %r" % username)
    token = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
    storage.add_token(username, digest(token), description, now)
    return token


def authenticate(storage, username, token):
    """The user name if ``token`` belongs to ``username``, else None (never says why)."""
    if not username or not token:
        return None
    owner = storage.token_user(digest(token))
    if owner is None or not hmac.compare_digest(owner, username):
        return None
    return owner
