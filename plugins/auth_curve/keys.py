"""The allowed worker keys: one public zmq.auth certificate ``<hostname>.key`` per worker in
``[auth_curve] workers_certs``, as LAVA's ``--slaves-certs`` directory holds them.

``scan()`` looks at the directory's signature (name, size, mtime, inode of every ``*.key``)
and re-reads only the files that changed, so a poll costs a few stat calls. A key that was
allowed and whose file went away is remembered as *revoked*, so the log can say so.
"""

import logging
import os
import stat

from lavacore.certs import SUFFIX, CertError, read_key_file

log = logging.getLogger("lavacore.auth_curve")


class KeyDirectory:
    def __init__(self, path):
        self.path = path
        self.by_name = {}    # file stem (a hostname) -> z85 public key
        self.by_key = {}     # z85 public key -> tuple of file stems holding it
        self.revoked = {}    # z85 key -> the stems it had when its last file went away
        self.generation = 0  # bumped at every change of the key set
        self._files = {}     # file name -> ((size, mtime_ns, inode), key or None)
        self._signature = None
        self._dir_error = None

    def names_of(self, key):
        return self.by_key.get(key, ())

    def __len__(self):
        return len(self.by_key)

    def signature(self):
        entries = []
        with os.scandir(self.path) as listing:
            for entry in listing:
                if not entry.name.endswith(SUFFIX) or entry.name.startswith("."):
                    continue
                try:
                    info = entry.stat()  # follows a symlink, as the key files may be
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    entries.append((entry.name, info.st_size, info.st_mtime_ns, info.st_ino))
        entries.sort()
        return tuple(entries)

    def scan(self, force=False):
        """Re-read what changed (every file with ``force``); True if the key set changed."""
        try:
            signature = self.signature()
            if self._dir_error is not None:
                log.info("workers_certs %s is readable again", self.path)
                self._dir_error = None
        except OSError as exc:
            # Fail closed: keys that cannot be seen are not allowed.
            if self._dir_error != str(exc):
                self._dir_error = str(exc)
                log.error("workers_certs: cannot read %s: %s; no worker key is allowed until"
                          " it is back", self.path, exc.strerror or exc)
            signature = ()
        if signature == self._signature and not force:
            return False
        files = {}
        for name, size, mtime, inode in signature:
            stamp = (size, mtime, inode)
            cached = self._files.get(name)
            if cached is not None and cached[0] == stamp and not force:
                files[name] = cached
            else:
                files[name] = (stamp, self._read(name))
        self._files = files
        self._signature = signature
        return self._rebuild()

    def _read(self, filename):
        path = os.path.join(self.path, filename)
        try:
            public, secret = read_key_file(path)
        except CertError as exc:
            log.error("workers_certs: ignored %s", exc)
            return None
        if secret is not None:
            log.warning("workers_certs: %s holds a secret key; only its public key is used"
                        " (keep workers' secret keys off the master)", path)
        return public

    def _rebuild(self):
        by_name = {}
        by_key = {}
        for filename, (_, key) in sorted(self._files.items()):
            if key is None:
                continue
            name = filename[:-len(SUFFIX)]
            by_name[name] = key
            by_key.setdefault(key, []).append(name)
        by_key = {key: tuple(names) for key, names in by_key.items()}
        if by_name == self.by_name and by_key == self.by_key:
            return False
        # The first load is summed up by the caller, not logged key by key.
        added = sorted(set(by_name) - set(self.by_name)) if self.generation else ()
        for name in added:
            log.info("worker key allowed: %s (%s)", name, by_name[name])
        for name in sorted(set(self.by_name) & set(by_name)):
            if by_name[name] != self.by_name[name]:
                log.warning("worker key replaced: %s (%s, was %s)", name, by_name[name],
                            self.by_name[name])
        for name in sorted(set(self.by_name) - set(by_name)):
            log.warning("worker key revoked: %s (%s); its sessions are refused from now on",
                        name, self.by_name[name])
        for key in set(self.by_key) - set(by_key):
            self.revoked[key] = self.by_key[key]
        for key in by_key:
            self.revoked.pop(key, None)
        self.by_name = by_name
        self.by_key = by_key
        self.generation += 1
        return True

    def why_not(self, key):
        """Why ``key`` is not allowed: 'revoked (...)' or 'unknown key (...)'."""
        names = self.revoked.get(key)
        if names:
            return "revoked key (%s removed from %s)" % (
                ", ".join(n + SUFFIX for n in names), self.path)
        return "unknown key (no .key file in %s holds it)" % self.path
