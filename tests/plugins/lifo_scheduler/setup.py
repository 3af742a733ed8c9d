"""A third-party scheduler plugin, as a site would ship it: newest job first."""

from setuptools import setup

setup(
    name="lavacore-lifo-scheduler",
    version="1.0",
    packages=["lavacore_lifo"],
    entry_points={"lavacore.plugins": ["lifo = lavacore_lifo"]},
)
