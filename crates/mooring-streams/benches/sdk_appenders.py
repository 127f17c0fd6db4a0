"""The stream-manager SDK's benchmark scenario, driven by `benches/append.rs`.

Several appenders, each a thread with its own `StreamManagerClient` (the official
`stream-manager` PyPI SDK, unmodified), call `append_message` in a loop and wait for every
acknowledgement before sending the next message, as a Greengrass component does. The stream
already exists (the Rust bench creates it with the flushOnWrite setting under test).

Usage: python sdk_appenders.py PORT STREAM SIZE COUNT APPENDERS
Prints one line of JSON: {"messages": N, "seconds": S}, timed from the moment every client is
connected until the last acknowledgement.
"""

import json
import sys
import threading
import time

from stream_manager import StreamManagerClient


def main():
    port, stream, size, count, appenders = sys.argv[1:6]
    port, size, count, appenders = int(port), int(size), int(count), int(appenders)
    per = count // appenders
    clients = [StreamManagerClient(host="127.0.0.1", port=port) for _ in range(appenders)]
    payload = bytes([0x5A]) * size
    start = threading.Barrier(appenders + 1)
    failures = []

    def appender(client):
        start.wait()
        try:
            for _ in range(per):
                client.append_message(stream, payload)
        except Exception as e:  # reported to the bench, which fails loudly
            failures.append(repr(e))

    threads = [threading.Thread(target=appender, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    for c in clients:
        c.close()
    if failures:
        print(json.dumps({"error": failures[0]}))
        sys.exit(1)
    print(json.dumps({"messages": per * appenders, "seconds": seconds}))


if __name__ == "__main__":
    main()
