"""The liveness watchdog."""

from .base import Service


class WatchdogService(Service):
    """Marks workers Offline after worker_timeout of silence and finishes jobs whose
    lava/job result never came within the grace period after END."""

    name = "watchdog"

    def run(self):
        interval = self.master.config.master.watchdog_interval
        while not self.wait(interval):
            self.master.check_liveness()
