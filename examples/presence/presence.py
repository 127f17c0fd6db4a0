#!/usr/bin/env python3
"""The presence example's local function, and a tiny query tool for the same state.

As a function (no arguments) it receives one AWS IoT lifecycle event as JSON on stdin,
the output of the rule `SELECT * FROM '$aws/events/#'`, and records per client id:

- whether its socket is connected (`connected` / `disconnected` events), and
- which chat it is subscribed to (`subscribed` / `unsubscribed` to `chat/{id}`).

Invocations run concurrently and can arrive out of order, so each half of the state is
only overwritten by an event with a newer timestamp, under a file lock (readers take it
shared, so they never see a half-written file).

As a tool: `presence.py show` prints the state, `presence.py route USER CHAT` prints
`socket` when USER is connected and subscribed to CHAT (send over MQTT), else `push`
(send a push notification), which is the decision the seed's application makes.
"""

import fcntl
import json
import os
import sys

STATE = os.environ.get("PRESENCE_STATE_FILE", "presence-state.json")


def load(f):
    f.seek(0)
    text = f.read()
    return json.loads(text) if text.strip() else {}


def apply(state, event):
    user = event.get("clientId")
    kind = event.get("eventType")
    stamp = event.get("timestamp", 0)
    if not user or not kind:
        return
    entry = state.setdefault(user, {"connected": False, "connectedAt": 0, "chatId": None, "chatAt": 0})
    if kind in ("connected", "disconnected") and stamp >= entry["connectedAt"]:
        entry["connected"] = kind == "connected"
        entry["connectedAt"] = stamp
        if kind == "disconnected":  # a closed socket has no subscriptions left
            entry["chatId"] = None
            entry["chatAt"] = stamp
    elif kind in ("subscribed", "unsubscribed") and stamp >= entry["chatAt"]:
        for topic in event.get("topics", []):
            parts = topic.split("/")
            if len(parts) == 2 and parts[0] == "chat":
                entry["chatId"] = parts[1] if kind == "subscribed" else None
                entry["chatAt"] = stamp


def record(event):
    with open(STATE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        state = load(f)
        apply(state, event)
        f.seek(0)
        f.truncate()
        json.dump(state, f, indent=1, sort_keys=True)


def main(argv):
    if len(argv) == 1:
        record(json.load(sys.stdin))
        return 0
    try:
        with open(STATE) as f:
            # A writer truncates and rewrites under its exclusive lock: read under a shared one.
            fcntl.flock(f, fcntl.LOCK_SH)
            state = load(f)
    except FileNotFoundError:
        state = {}
    if argv[1] == "show":
        print(json.dumps(state, indent=1, sort_keys=True))
        return 0
    if argv[1] == "route" and len(argv) == 4:
        entry = state.get(argv[2], {})
        live = entry.get("connected") and entry.get("chatId") == argv[3]
        print("socket" if live else "push")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
