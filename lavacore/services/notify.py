"""Changes made by other processes, picked up at once."""

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
        while not self.stopping.is_set():
            for payload in self.listener.wait(0.5):
                if not isinstance(payload, dict) or "kind" not in payload:
                    self.log.warning("ignored a notification without kind")
                    continue
                self.master.notified(payload)
