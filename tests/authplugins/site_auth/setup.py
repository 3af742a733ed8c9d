"""A site's worker-identity policy, shipped as its own package: group keys for racks."""

from setuptools import setup

setup(
    name="lavacore-site-auth",
    version="1.0",
    packages=["lavacore_site_auth"],
    entry_points={"lavacore.plugins": ["site_auth = lavacore_site_auth"]},
)
