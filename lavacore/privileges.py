"""Dropping root: a master started as root binds its sockets, then runs as ``[master]
user`` (and ``group``, by default the user's own).

What the master writes must then belong to that user: before dropping, the SQLite
database (with its -wal and -shm files) and the job output directory are given to it
(the whole tree the first time, when its top directory still belongs to someone else).
"""

import grp
import logging
import os
import pwd

from .config import ConfigError

log = logging.getLogger("lavacore.master")


class Identity:
    def __init__(self, name, uid, gid):
        self.name = name
        self.uid = uid
        self.gid = gid

    def __repr__(self):
        return "%s (uid %d, gid %d)" % (self.name, self.uid, self.gid)


def identity(user, group="", key="[master] user"):
    """The uid and gid of ``user`` (and ``group``); ConfigError naming the key."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError("%s: no such user %r" % (key, user)) from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("%s: no such group %r" % (key.replace("user", "group"),
                                                       group)) from None
    return Identity(user, entry.pw_uid, gid)


def wanted(config):
    """The identity the master should run as, or None (stay as started)."""
    user = config.master.user
    if not user:
        return None
    target = identity(user, config.master.group)
    if os.geteuid() != 0:
        if os.geteuid() == target.uid:
            return None  # already that user
        raise ConfigError("[master] user: %s, but the master was not started as root"
                          " (it runs as uid %d)" % (user, os.geteuid()))
    return target


def give(paths, target):
    """Make ``paths`` (files or directory trees) belong to ``target``."""
    changed = 0
    for path in paths:
        if not path or not os.path.lexists(path):
            continue
        top = os.lstat(path)
        if top.st_uid == target.uid and top.st_gid == target.gid:
            continue  # done before (a tree given once stays given)
        os.lchown(path, target.uid, target.gid)
        changed += 1
        if os.path.isdir(path) and not os.path.islink(path):
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.lchown(os.path.join(root, name), target.uid, target.gid)
                    changed += 1
    return changed


def drop(target):
    """Become ``target`` for good (supplementary groups of the user included)."""
    os.initgroups(target.name, target.gid)
    os.setgid(target.gid)
    os.setuid(target.uid)
    if os.getuid() != target.uid or os.geteuid() != target.uid:
        raise RuntimeError("could not drop to %r" % target)
    log.info("running as %r from now on", target)
