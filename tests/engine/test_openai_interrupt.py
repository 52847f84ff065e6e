"""Ctrl-C (SIGINT) ends a proposer call within seconds, during a backoff wait or a request in flight."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.support.fake_openai_server import Fault, FakeOpenAIServer, Reply

GOOD = json.dumps({"thought": "t", "name": "n", "code": "def n(self, x):\n    return x\n"})

# the child makes one call with the real time.sleep and the default SIGINT handler
CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from engine.config import ProposerConfig
from engine.openai_proposer import OpenAIProposer
from engine.proposer import ProposalRequest

config = ProposerConfig(kind="openai", model="m", base_url=sys.argv[1], timeout_s=60, retry_max_s=60)
request = ProposalRequest(messages=[{"role": "user", "content": "go"}], history=[], generation=1, attempt=1, seed=0)
OpenAIProposer(config).propose(request)
"""


def default_sigint() -> None:
    """Give the child SIGINT's default disposition, as a program started from a terminal has.

    A test run started in the background by a non-interactive shell (`cmd &`)
    inherits SIGINT as ignored, so Python installs no KeyboardInterrupt
    handler. The child must not depend on how pytest itself was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_child(base_url: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, base_url], cwd=ROOT, env=env, preexec_fn=default_sigint,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read_until(child: subprocess.Popen, marker: str, timeout_s: float) -> str:
    """Return the child's stderr up to the first line containing `marker`, or all of it on timeout."""
    seen = []
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(child.stderr, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                break
            line = child.stderr.readline()
            if not line:
                break
            seen.append(line)
            if marker in line:
                break
    return "".join(seen)


def interrupt(child: subprocess.Popen) -> tuple[float, str]:
    """Send SIGINT and return the seconds until the child exited and the rest of its stderr."""
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    try:
        _, rest = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()  # reap it, so no zombie outlives the test
    return time.monotonic() - sent, rest


def test_ctrl_c_during_backoff_wait():
    with FakeOpenAIServer([Fault(429, "slow down", retry_after="30")]) as server:
        child = start_child(server.base_url)
        before = read_until(child, "retrying in 30.00 s", timeout_s=60)
        assert "retrying in 30.00 s" in before, before
        elapsed, rest = interrupt(child)
    assert elapsed < 3.0
    assert child.returncode != 0
    assert "KeyboardInterrupt" in rest


def test_ctrl_c_during_request_in_flight():
    with FakeOpenAIServer([Reply(GOOD, delay_s=30.0)]) as server:
        child = start_child(server.base_url)
        assert server.wait_for_requests(1, timeout_s=60)
        elapsed, rest = interrupt(child)
    assert elapsed < 3.0
    assert child.returncode != 0
    assert "KeyboardInterrupt" in rest
