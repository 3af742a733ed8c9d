"""The web pages of the master's HTTP service (jinja2 templates, one stylesheet, one small
script): see pages.py for the addresses, session.py for logging in and CSRF, logview.py
for reading big logs a window at a time."""

from .pages import Pages

__all__ = ["Pages"]
