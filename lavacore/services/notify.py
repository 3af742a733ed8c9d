"""Changes made by other processes, picked up at once."""

from ..ratelog import RateLimitedLog
from .base import Service


class NotifyService(Service):
    """Events from other processes on the same storage (the CLI, another API process),
    republished and acted on as if this master had made the change."""

    name = "notify"

    def __init__(self, master):
        super().__init__(master)
        self.listener = None

    def setup(self):
        self.listener = self.master.storage.listen_events()

    def teardown(self):
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def run(self):
        if self.listener is None:
            return super().run()
        drops = RateLimitedLog(self.log)
        while not self.stopping.is_set():
            for payload in self.listener.wait(0.5):
                if not isinstance(payload, dict) or "kind" not in payload:
                    drops.warning("kind", "ignored a notification without kind")
                    continue
                try:
                    self.master.notified(payload)
                except Exception as exc:  # noqa: BLE001 - one notification, never the master
                    drops.error("bad", "ignored a notification: %s: %s",
                                type(exc).__name__, exc, exc_info=True)
