"""What the storage keeps about people: users, groups and their members, model-wide and
per-object permissions, tags, aliases, remote artifact tokens and the audit trail.

A mixin of :class:`lavacore.storage.SQLStorage`, in the same portable SQL (``?``
placeholders, ``ON CONFLICT``); adds return True when a row was made, False when it
existed, so the API can say "already exists" without a race.
"""

import json

from .models import User

USER_COLUMNS = ("username", "first_name", "last_name", "email", "is_active", "is_staff",
                "is_superuser", "date_joined", "last_login")
_BOOL_COLUMNS = ("is_active", "is_staff", "is_superuser")


def _user(row):
    values = dict(zip(USER_COLUMNS, row))
    for column in _BOOL_COLUMNS:
        values[column] = bool(values[column])
    return User(**values)


class AccountStorage:
    # -- users --------------------------------------------------------------------------

    def get_user(self, username):
        from .storage import NotFound

        row = self._one("SELECT %s FROM users WHERE username = ?" % ", ".join(USER_COLUMNS),
                        (username,))
        if row is None:
            raise NotFound("user %s does not exist" % username)
        return _user(row)

    def list_users(self):
        return [_user(row) for row in self._all(
            "SELECT %s FROM users ORDER BY username" % ", ".join(USER_COLUMNS))]

    def add_user(self, user):
        values = [getattr(user, c) for c in USER_COLUMNS]
        values = [int(v) if c in _BOOL_COLUMNS else v for c, v in zip(USER_COLUMNS, values)]
        cursor = self._execute(
            "INSERT INTO users (%s) VALUES (%s) ON CONFLICT (username) DO NOTHING"
            % (", ".join(USER_COLUMNS), ", ".join("?" * len(USER_COLUMNS))), values)
        return cursor.rowcount > 0

    def ensure_user(self, username, now):
        """The user, made a plain one if it does not exist (a token's owner, as before)."""
        self.add_user(User(username, date_joined=now))
        return self.get_user(username)

    def update_user(self, username, **fields):
        from .storage import NotFound

        unknown = set(fields) - set(USER_COLUMNS[1:])
        if unknown:
            raise ValueError("users have no field %s" % ", ".join(sorted(unknown)))
        if not fields:
            return
        params = [int(v) if k in _BOOL_COLUMNS else v for k, v in fields.items()]
        cursor = self._execute("UPDATE users SET %s WHERE username = ?" % ", ".join(
            "%s = ?" % k for k in fields), params + [username])
        if cursor.rowcount == 0:
            raise NotFound("user %s does not exist" % username)

    def delete_user(self, username):
        with self.transaction():
            for statement in ("DELETE FROM group_members WHERE username = ?",
                              "DELETE FROM permissions WHERE holder_kind = 'user'"
                              " AND holder = ?",
                              "DELETE FROM tokens WHERE username = ?",
                              "DELETE FROM artifact_tokens WHERE username = ?"):
                self._execute(statement, (username,))
            return self._execute("DELETE FROM users WHERE username = ?",
                                 (username,)).rowcount > 0

    # -- groups ---------------------------------------------------------------------------

    def list_groups(self):
        return [row[0] for row in self._all("SELECT name FROM user_groups ORDER BY name")]

    def group_exists(self, name):
        return self._one("SELECT 1 FROM user_groups WHERE name = ?", (name,)) is not None

    def add_group(self, name):
        return self._execute("INSERT INTO user_groups (name) VALUES (?) ON CONFLICT (name)"
                             " DO NOTHING", (name,)).rowcount > 0

    def delete_group(self, name):
        with self.transaction():
            for statement in ("DELETE FROM group_members WHERE group_name = ?",
                              "DELETE FROM permissions WHERE holder_kind = 'group'"
                              " AND holder = ?",
                              "DELETE FROM object_permissions WHERE group_name = ?"):
                self._execute(statement, (name,))
            return self._execute("DELETE FROM user_groups WHERE name = ?",
                                 (name,)).rowcount > 0

    def group_members(self, name):
        return [row[0] for row in self._all(
            "SELECT username FROM group_members WHERE group_name = ? ORDER BY username",
            (name,))]

    def user_groups(self, username):
        return [row[0] for row in self._all(
            "SELECT group_name FROM group_members WHERE username = ? ORDER BY group_name",
            (username,))]

    def add_member(self, group, username):
        return self._execute("INSERT INTO group_members (group_name, username) VALUES (?, ?)"
                             " ON CONFLICT (group_name, username) DO NOTHING",
                             (group, username)).rowcount > 0

    def remove_member(self, group, username):
        return self._execute("DELETE FROM group_members WHERE group_name = ? AND username = ?",
                             (group, username)).rowcount > 0

    # -- permissions ------------------------------------------------------------------------

    def add_permission(self, holder_kind, holder, app, model, codename):
        return self._execute(
            "INSERT INTO permissions (holder_kind, holder, app, model, codename)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (holder_kind, holder, app, model, codename)"
            " DO NOTHING", (holder_kind, holder, app, model, codename)).rowcount > 0

    def remove_permission(self, holder_kind, holder, app, model, codename):
        return self._execute(
            "DELETE FROM permissions WHERE holder_kind = ? AND holder = ? AND app = ?"
            " AND model = ? AND codename = ?",
            (holder_kind, holder, app, model, codename)).rowcount > 0

    def list_permissions(self, holder_kind, holder):
        return [{"app": r[0], "model": r[1], "codename": r[2]} for r in self._all(
            "SELECT app, model, codename FROM permissions WHERE holder_kind = ?"
            " AND holder = ? ORDER BY app, model, codename", (holder_kind, holder))]

    def model_permissions(self, username, groups):
        """'app.codename' of every model-wide permission of a user and its groups."""
        groups = list(groups)
        marks = ", ".join("?" * len(groups))
        statement = ("SELECT app, codename FROM permissions WHERE (holder_kind = 'user'"
                     " AND holder = ?)")
        if groups:
            statement += " OR (holder_kind = 'group' AND holder IN (%s))" % marks
        return {"%s.%s" % row for row in self._all(statement, [username] + groups)}

    def add_object_permission(self, kind, name, group, codename):
        return self._execute(
            "INSERT INTO object_permissions (kind, name, group_name, codename)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (kind, name, group_name, codename) DO NOTHING",
            (kind, name, group, codename)).rowcount > 0

    def remove_object_permission(self, kind, name, group, codename):
        return self._execute(
            "DELETE FROM object_permissions WHERE kind = ? AND name = ? AND group_name = ?"
            " AND codename = ?", (kind, name, group, codename)).rowcount > 0

    def object_permissions(self, kind=None, name=None):
        """[(kind, name, group, codename)]: all of them (a small table) or one object's."""
        where, params = [], []
        for column, value in (("kind", kind), ("name", name)):
            if value is not None:
                where.append("%s = ?" % column)
                params.append(value)
        return [tuple(row) for row in self._all(
            "SELECT kind, name, group_name, codename FROM object_permissions%s"
            " ORDER BY kind, name, group_name, codename"
            % (" WHERE " + " AND ".join(where) if where else ""), params)]

    # -- tags and aliases -------------------------------------------------------------------

    def list_tags(self):
        """{name: description} of the tags described and of those devices carry."""
        tags = {row[0]: row[1] for row in self._all("SELECT name, description FROM tags")}
        for device in self.list_devices():
            for tag in device.tags:
                tags.setdefault(tag, "")
        return dict(sorted(tags.items()))

    def add_tag(self, name, description=""):
        return self._execute("INSERT INTO tags (name, description) VALUES (?, ?)"
                             " ON CONFLICT (name) DO NOTHING",
                             (name, description or "")).rowcount > 0

    def delete_tag(self, name):
        """Forget a tag, and take it off every device carrying it."""
        with self.transaction():
            found = self._execute("DELETE FROM tags WHERE name = ?", (name,)).rowcount > 0
            for device in self.list_devices():
                if name in device.tags:
                    self.update_device(device.hostname,
                                       tags=[t for t in device.tags if t != name])
                    found = True
            return found

    def list_aliases(self, device_type=None):
        if device_type is None:
            rows = self._all("SELECT name, device_type FROM aliases ORDER BY name")
        else:
            rows = self._all("SELECT name, device_type FROM aliases WHERE device_type = ?"
                             " ORDER BY name", (device_type,))
        return [(row[0], row[1]) for row in rows]

    def get_alias(self, name):
        row = self._one("SELECT device_type FROM aliases WHERE name = ?", (name,))
        return row[0] if row else None

    def add_alias(self, name, device_type):
        return self._execute("INSERT INTO aliases (name, device_type) VALUES (?, ?)"
                             " ON CONFLICT (name) DO NOTHING", (name, device_type)).rowcount > 0

    def delete_alias(self, name):
        return self._execute("DELETE FROM aliases WHERE name = ?", (name,)).rowcount > 0

    # -- remote artifact tokens -------------------------------------------------------------

    def artifact_tokens(self, username):
        """{name: token} of a user's remote artifact tokens."""
        return {row[0]: row[1] for row in self._all(
            "SELECT name, token FROM artifact_tokens WHERE username = ? ORDER BY name",
            (username,))}

    def add_artifact_token(self, username, name, token):
        return self._execute("INSERT INTO artifact_tokens (username, name, token)"
                             " VALUES (?, ?, ?) ON CONFLICT (username, name) DO NOTHING",
                             (username, name, token)).rowcount > 0

    def delete_artifact_token(self, username, name):
        return self._execute("DELETE FROM artifact_tokens WHERE username = ? AND name = ?",
                             (username, name)).rowcount > 0

    # -- the audit trail --------------------------------------------------------------------

    def add_audit(self, now, username, kind, name, action, before=None, after=None):
        self._execute("INSERT INTO audit (time, username, kind, name, action, before, after)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (now, username, kind, name, action, _json(before), _json(after)))

    def list_audit(self, since=None, kind=None, name=None, limit=1000):
        where, params = [], []
        for clause, value in (("time >= ?", since), ("kind = ?", kind), ("name = ?", name)):
            if value is not None:
                where.append(clause)
                params.append(value)
        rows = self._all("SELECT time, username, kind, name, action, before, after FROM audit"
                         "%s ORDER BY id DESC LIMIT %d"
                         % (" WHERE " + " AND ".join(where) if where else "", int(limit)),
                         params)
        return [{"time": r[0], "user": r[1], "kind": r[2], "name": r[3], "action": r[4],
                 "before": _unjson(r[5]), "after": _unjson(r[6])} for r in rows]


def _json(value):
    return None if value is None else json.dumps(value, default=str, sort_keys=True)


def _unjson(text):
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
