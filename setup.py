"""One distribution: the lavacore core and its builtin plugins (package lavacore_plugins).

Builtin plugins are registered through the entry-point group ``lavacore.plugins``, the same
way a third party's plugin is.
"""

from setuptools import find_packages, setup

PLUGINS = [
    "scheduler_fifo",
    "storage_sqlite",
    "storage_postgres",
    "multinode",
    "auth_curve",
    "metrics",
]

setup(
    name="lavacore",
    version="0.1.0",
    description="A LAVA protocol v3 test-job dispatcher for device labs, on gevent and pluggy",
    python_requires=">=3.11",
    packages=find_packages(include=["lavacore", "lavacore.*"])
    + ["lavacore_plugins"]
    + ["lavacore_plugins." + name for name in find_packages("plugins")],
    package_dir={"lavacore_plugins": "plugins"},
    # The web pages' templates and static files.
    package_data={"lavacore.web": ["templates/*.html", "static/*"]},
    install_requires=[
        "gevent>=23.9",
        "pyzmq>=25",
        "pluggy>=1.3",
        "pyyaml>=6",
        "jinja2>=3.1",
        # LAVA's job schema library (lavacore/jobschema.py).
        "voluptuous>=0.13",
        # /metrics (lavacore/metrics.py): registry, exposition formats, process collectors.
        "prometheus_client>=0.17",
    ],
    extras_require={
        # The PostgreSQL storage plugin; psycopg2 is built from source (libpq-dev).
        "postgres": ["psycopg2>=2.9"],
        "test": ["psycopg2>=2.9", "pytest>=7", "pytest-timeout", "hypothesis",
                 "lavacli==3.1.0", "wheel",
                 # The web pages' tests drive Debian's chromium (chromium-driver).
                 "selenium>=4.20"],
    },
    entry_points={
        "console_scripts": [
            "lavacore = lavacore.cli:main",
            "lavacore-run = lavacore.worker.runner:main",
            "lavacore-lava-run = lavacore.worker.lavarun:main",
        ],
        "lavacore.plugins": [
            "%s = lavacore_plugins.%s" % (name, name) for name in PLUGINS
        ],
    },
)
