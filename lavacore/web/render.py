"""Templates, links and the headers every page carries.

Everything a page shows comes from someone else (job names, definitions, log lines,
device names, failure comments, result metadata): templates autoescape, control
characters (NUL, ESC...) are shown as symbols, links are built here with each part
quoted, only http(s) and ftp links are ever made from data, and the
Content-Security-Policy allows no inline script or style at all.
"""

import datetime
import hashlib
import os
import re
import urllib.parse

import jinja2

from .. import present

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC_DIR = os.path.join(HERE, "static")
TEMPLATE_DIR = os.path.join(HERE, "templates")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
       " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
]
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
SAFE_SCHEMES = ("http", "https", "ftp")


# Control characters but tab, line feed and carriage return (which text shows as space
# and line breaks): C0, DEL and C1.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _shown(match):
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)    # the Control Pictures block: NUL is ␀, ESC is ␛
    if code == 0x7f:
        return "\u2421"               # ␡
    return "\\x%02x" % code           # C1 controls have no picture: \x9b


def visible(text):
    """``text`` with its control characters shown as symbols (␀ for NUL, ␛ for ESC,
    \\x9b for a C1 control), so that none reaches a page raw (jinja2 escapes markup,
    not those). Markup stays Markup; anything else is returned as it is."""
    if isinstance(text, str) and _CONTROL.search(text):
        return type(text)(_CONTROL.sub(_shown, text))
    return text


def _quote(value):
    return urllib.parse.quote(str(value), safe="")


def job_url(job_id, suffix=""):
    return "/jobs/%s%s" % (_quote(job_id), suffix)


def device_url(hostname):
    return "/devices/%s" % _quote(hostname)


def worker_url(hostname):
    return "/workers/%s" % _quote(hostname)


def query_url(path, **params):
    """``path?k=v...`` for the parameters that have a value."""
    kept = [(key, str(value)) for key, value in params.items()
            if value is not None and value != ""]
    return path + ("?" + urllib.parse.urlencode(kept) if kept else "")


def safe_link(value):
    """``value`` when it is an absolute http(s)/ftp URL a page may link to, else None
    (a ``javascript:`` or ``data:`` reference is shown as text, never as a link)."""
    if not isinstance(value, str) or len(value) > 4096:
        return None
    try:
        parts = urllib.parse.urlsplit(value.strip())
    except ValueError:
        return None
    if parts.scheme.lower() not in SAFE_SCHEMES or not parts.netloc:
        return None
    if any(ord(c) < 0x21 for c in value.strip()):
        return None
    return value.strip()


def when(epoch):
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS`` (UTC); ``-`` for none."""
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


def ago(epoch, now):
    if epoch is None:
        return ""
    return present.duration_text(max(0, now - epoch)) + " ago"


class Static:
    """The files under static/, read once (a fixed set: no path from a request is ever
    opened), each with a short hash for links that change when the file does."""

    def __init__(self):
        self.files = {}
        for name in sorted(os.listdir(STATIC_DIR)):
            kind = STATIC_TYPES.get(os.path.splitext(name)[1])
            if kind is None:
                continue
            with open(os.path.join(STATIC_DIR, name), "rb") as handle:
                data = handle.read()
            self.files[name] = (data, kind, hashlib.sha256(data).hexdigest()[:12])

    def url(self, name):
        return "/static/%s?v=%s" % (name, self.files[name][2])


class Renderer:
    def __init__(self):
        self.static = Static()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
            finalize=visible)  # every {{ value }}: no raw control character in a page
        self.env.globals.update(
            job_url=job_url, device_url=device_url, worker_url=worker_url,
            query_url=query_url, static=self.static.url, safe_link=safe_link,
            value_text=present.value_text, duration_text=present.duration_text)
        self.env.filters.update(when=when, value=present.value_text)

    def page(self, name, **context):
        return self.env.get_template(name).render(**context).encode("utf-8")
