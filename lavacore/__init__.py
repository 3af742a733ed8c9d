"""lavacore: a LAVA protocol v3 test-job dispatcher on gevent and pluggy."""

__version__ = "0.1.0"
