"""Callbacks of the awsiotsdk service clients (jobs, shadow), collected for a test to wait on
by name. The SDK calls back from its own threads and in no guaranteed order, so an event that
arrives before the one a step waits for is held for a later step."""

import queue
import time


class SdkEvents:
    def __init__(self):
        self.events = queue.Queue()
        self.held = []

    def on(self, name):
        """A callback that records each response under `name`."""
        return lambda response: self.events.put((name, response))

    def expect(self, name, timeout=10):
        """The next response recorded under `name`; raises queue.Empty after `timeout` s."""
        for i, (got, response) in enumerate(self.held):
            if got == name:
                del self.held[i]
                return response
        deadline = time.time() + timeout
        while True:
            got, response = self.events.get(timeout=max(deadline - time.time(), 0.01))
            if got == name:
                return response
            self.held.append((got, response))
