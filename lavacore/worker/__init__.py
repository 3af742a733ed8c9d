"""The worker (``slave.Worker``, lava-slave's role) and the built-in runner (``runner``,
``lavacore-run``). Nothing is imported here: the runner must not pull in gevent."""
