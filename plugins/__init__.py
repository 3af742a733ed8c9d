"""Builtin lavacore plugins, installed as the package ``lavacore_plugins``."""
