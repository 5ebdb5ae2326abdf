"""The one shape of Levqor's background loops: a daemon thread started in
the process that runs it (after gunicorn forks, never before) and stopped at
shutdown. A subclass names its thread and writes ``_run``, which loops until
``self._stop`` is set; ``self._stop.wait(seconds)`` sleeps and says whether
to stop."""

import threading


class Background:
    NAME = "levqor-background"
    JOIN = 5.0  # seconds stop() waits for the loop to end

    def __init__(self):
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        """Start the loop (again, if it had ended)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.NAME, daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.JOIN)

    def _run(self):
        raise NotImplementedError
