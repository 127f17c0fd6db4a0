"""examples/presence end to end: the example's own config and function, paho clients
connecting, subscribing to chat/{id} and disconnecting, and the function's state and
routing answers checked after each step."""

import json
import subprocess
import sys
import time
from pathlib import Path

from test_mqtt import Client

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "presence"


def test_presence_example_tracks_sockets_and_chats(mooring_factory, tmp_path):
    state = tmp_path / "presence-state.json"
    script = EXAMPLE / "presence.py"
    config = (EXAMPLE / "mooring.toml").read_text()
    assert "SELECT * FROM '$aws/events/#'" in config
    config = config.replace('"python3", "presence.py"', f'"{sys.executable}", "{script}"').replace(
        '"presence-state.json"', f'"{state}"')
    (tmp_path / "mooring.toml").write_text(config)
    m = mooring_factory(extra_args=["--config", str(tmp_path / "mooring.toml")])
    assert m.client("iot").get_topic_rule(ruleName="presence")["rule"]["sql"] == "SELECT * FROM '$aws/events/#'"

    def tool(*args):
        out = subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True,
                             text=True, env={"PRESENCE_STATE_FILE": str(state)})
        return out.stdout.strip()

    def wait_for(predicate, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            current = json.loads(tool("show"))
            if predicate(current):
                return current
            assert time.monotonic() < deadline, current
            time.sleep(0.1)

    alice = Client(m, client_id="alice")
    alice.sub("chat/42", 1)
    bob = Client(m, client_id="bob")
    bob.sub("chat/7", 1)
    wait_for(lambda s: s.get("alice", {}).get("chatId") == "42" and s.get("bob", {}).get("chatId") == "7")
    assert tool("route", "alice", "42") == "socket"
    assert tool("route", "alice", "7") == "push"
    assert tool("route", "bob", "7") == "socket"
    assert tool("route", "carol", "7") == "push"

    bob.stop()
    current = wait_for(lambda s: s["bob"]["connected"] is False)
    assert current["bob"]["chatId"] is None
    assert current["alice"]["connected"] is True
    assert tool("route", "bob", "7") == "push"

    alice.c.unsubscribe("chat/42")
    wait_for(lambda s: s["alice"]["chatId"] is None)
    assert tool("route", "alice", "42") == "push"
    alice.sub("chat/43", 1)
    wait_for(lambda s: s["alice"]["chatId"] == "43")
    assert tool("route", "alice", "43") == "socket"
    alice.stop()
    wait_for(lambda s: s["alice"]["connected"] is False)
