"""The test shell helpers lavacore-run puts on the steps' PATH (``lava-test-case``,
``lava-test-set``, ``lava-send``...), with LAVA's names, arguments and output.

Each helper is a small wrapper script running ``python -I -S main.py NAME ARGS``: an
isolated interpreter without site-packages, so these modules use the standard library
only and import each other by plain name from this directory (main.py puts it on
sys.path). They report to the runner through the FIFO named by ``$LAVACORE_RESULTS``
(common.py), and the MultiNode ones talk to the coordinator themselves (multinode.py).
"""
