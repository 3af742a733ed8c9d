"""API tokens: random, URL-safe (lavacli puts them in the URL), stored only as a hash."""

import hashlib
import hmac
import secrets
import string
import time

from .storage import NotFound, StorageError

ALPHABET = string.ascii_letters + string.digits
LENGTH = 40


def digest(token):
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create(storage, username, description, now, expires=None):
    """Make a token for ``username`` (a plain user is made for a name without a record),
    store its hash and return (token id, token); the token is shown once, never stored.
    ``expires``: epoch seconds after which it is refused."""
    if not username or any(c.isspace() or c in ":@/" for c in username) or \
            len(username) > 150:
        raise ValueError("invalid user name %r" % username)
    token = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
    with storage.transaction():
        storage.ensure_user(username, now)
        token_id = storage.add_token(username, digest(token), description, now, expires)
    return token_id, token


# last_used is written at most this often per token: a client making a request a second
# would otherwise write to the database a second.
TOUCH_EVERY = 60.0


def authenticate(storage, username, token, now=None):
    """The user name if ``token`` is valid (and belongs to ``username``, when one is
    given), else None: wrong, expired, revoked, or its user inactive. Never says why."""
    if not token or len(token) > 512:
        return None
    record = storage.token_record(digest(token))
    if record is None:
        return None
    token_id, owner, expires, last_used = record
    if username is not None and not hmac.compare_digest(owner, username):
        return None
    now = time.time() if now is None else now
    if expires is not None and now >= expires:
        return None
    try:
        if not storage.get_user(owner).is_active:
            return None
    except NotFound:  # a token made before users had records: a plain user
        pass
    if last_used is None or now - last_used >= TOUCH_EVERY:
        try:
            storage.token_used(token_id, now)
        except StorageError:  # a full disk, say: the request is still served
            pass
    return owner
