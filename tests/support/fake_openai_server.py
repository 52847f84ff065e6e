"""An OpenAI-compatible chat-completions server on 127.0.0.1 that replays a script.

Each POST to .../chat/completions takes the next step of the script: a reply,
an HTTP error, a malformed body or a dropped connection. Every request is
logged with what was sent back, including the token usage the server billed,
so a test can compare the client's accounting with the server's.

    with FakeOpenAIServer([Reply(GOOD), Fault(429, retry_after="0.01"), Reply(GOOD)]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")

Run as a program, it serves a few valid loss replies in a loop, for trying
`evolve --base-url` by hand:

    python -m tests.support.fake_openai_server --port 8000
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Union


@dataclass(frozen=True)
class Reply:
    """A 200 response holding one chat completion.

    Attributes:
        content: the message text ("" for an empty reply).
        finish_reason: "stop", or "length" for a reply cut off at the token limit.
        prompt_tokens: billed prompt tokens; None bills the request's message
            characters divided by 4.
        completion_tokens: billed completion tokens; None bills len(content) // 4.
        model: the model name reported back; None echoes the requested model.
        delay_s: seconds to wait before replying, to run past a client timeout.
    """

    content: str
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True)
class Fault:
    """An HTTP error response with an OpenAI-style error body.

    Attributes:
        status: the HTTP status, such as 429 or 500.
        message: the error message in the body.
        retry_after: value of the Retry-After header, or None to send none.
    """

    status: int
    message: str = "scripted fault"
    retry_after: str | None = None


@dataclass(frozen=True)
class RawBody:
    """A response with an arbitrary body, such as JSON that does not decode."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"


@dataclass(frozen=True)
class Hangup:
    """Close the connection without sending a response."""


Step = Union[Reply, Fault, RawBody, Hangup]


@dataclass
class LoggedRequest:
    """One request the server received and what it sent back.

    Attributes:
        index: position in the request order, from 0.
        model: the model named in the request body.
        messages: the chat messages of the request.
        temperature: the sampling temperature requested, if any.
        max_tokens: the completion token limit requested, if any.
        step: the script step used for the response, or None when the script was used up.
        prompt_tokens: prompt tokens billed (0 unless a Reply answered).
        completion_tokens: completion tokens billed (0 unless a Reply answered).
        body: the decoded request body.
        headers: the request headers, with lowercase names.
    """

    index: int
    model: str
    messages: list[dict[str, Any]]
    temperature: float | None
    max_tokens: int | None
    step: Step | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def unused_port() -> int:
    """Return a loopback port that nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """Return the characters of all message contents, the basis of the default prompt billing."""
    return sum(len(str(message.get("content") or "")) for message in messages)


class FakeOpenAIServer:
    """Serves a script of replies and faults over real HTTP; use as a context manager."""

    def __init__(self, script: list[Step], port: int = 0, repeat: bool = False) -> None:
        self._script = list(script)
        # when repeating, the script restarts from its first step once it is used up
        self._cycle = itertools.cycle(list(script)) if repeat and script else None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._closing = threading.Event()
        # open client connections, shut down on close so that no kept-alive connection gets a reply afterwards
        self._connections: set[socket.socket] = set()
        self.requests: list[LoggedRequest] = []
        self._http = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._http.daemon_threads = True
        # a short poll interval lets close() return quickly; serve_forever checks for shutdown between polls
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-openai", daemon=True
        )

    @property
    def port(self) -> int:
        return self._http.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def remaining(self) -> int:
        """Script steps not yet used."""
        with self._lock:
            return len(self._script)

    def extend(self, steps: list[Step]) -> None:
        """Append steps to the script."""
        with self._lock:
            self._script.extend(steps)

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        # release handlers that are holding back a delayed reply, then stop
        self._closing.set()
        self._http.shutdown()
        self._http.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the client closed it already
        self._thread.join(timeout=5)

    def wait_for_requests(self, count: int, timeout_s: float = 30.0) -> bool:
        """Block until `count` requests have arrived; return False if the timeout passed first."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.requests) >= count, timeout=timeout_s)

    def billed_tokens(self) -> tuple[int, int]:
        """Return the (prompt, completion) tokens billed over all requests."""
        with self._lock:
            return (sum(r.prompt_tokens for r in self.requests), sum(r.completion_tokens for r in self.requests))

    def _next(self, body: dict[str, Any], headers: dict[str, str]) -> LoggedRequest:
        with self._lock:
            if self._cycle is not None:
                step = next(self._cycle)
            else:
                step = self._script.pop(0) if self._script else None
            logged = LoggedRequest(
                index=len(self.requests),
                model=str(body.get("model", "")),
                messages=list(body.get("messages") or []),
                temperature=body.get("temperature"),
                max_tokens=body.get("max_tokens", body.get("max_completion_tokens")),
                step=step,
                body=body,
                headers=headers,
            )
            if isinstance(step, Reply):
                logged.prompt_tokens = (
                    step.prompt_tokens if step.prompt_tokens is not None else prompt_chars(logged.messages) // 4
                )
                logged.completion_tokens = (
                    step.completion_tokens if step.completion_tokens is not None else len(step.content) // 4
                )
            self.requests.append(logged)
            self._arrived.notify_all()
            return logged

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send_json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    self._send_json(404, _error_body(f"no route {self.path}"))

            def do_POST(self) -> None:
                if server._closing.is_set():
                    self.close_connection = True
                    return
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send_json(404, _error_body(f"no route {self.path}"))
                    return
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send_json(400, _error_body("request body is not JSON"))
                    return
                logged = server._next(body, {name.lower(): value for name, value in self.headers.items()})
                step = logged.step
                if step is None:
                    self._send_json(500, _error_body("the fake server's script is used up"))
                elif isinstance(step, Reply):
                    if step.delay_s and server._closing.wait(step.delay_s):
                        return
                    self._send_json(200, _completion(step, logged))
                elif isinstance(step, Fault):
                    headers = {"Retry-After": step.retry_after} if step.retry_after is not None else {}
                    self._send_json(step.status, _error_body(step.message), headers)
                elif isinstance(step, RawBody):
                    self._send(step.status, step.body, step.content_type, {})
                else:
                    self.close_connection = True

            def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(payload).encode(), "application/json", headers or {})

            def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "fake_server_error", "code": None}}


def _completion(step: Reply, logged: LoggedRequest) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake-{logged.index}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": step.model or logged.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": step.content},
                "finish_reason": step.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": logged.prompt_tokens,
            "completion_tokens": logged.completion_tokens,
            "total_tokens": logged.prompt_tokens + logged.completion_tokens,
        },
    }


_HEADER = (
    "def {name}(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
    "    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
)
_DEMO_LOSSES = {
    "softplus_margin": "    return F.softplus(1.0 - self.beta * rho)\n",
    "squared_margin": "    return (self.beta * rho - 1.0) ** 2\n",
    "scaled_logistic": "    return -F.logsigmoid(2.0 * self.beta * rho)\n",
}


def demo_script() -> list[Step]:
    """Return replies with valid pairwise preference losses, the first one inside a ```json fence."""
    replies = []
    for index, (name, body) in enumerate(_DEMO_LOSSES.items()):
        code = "import torch.nn.functional as F\n\n" + _HEADER.format(name=name) + body
        text = json.dumps({"thought": f"try {name}", "name": name, "code": code})
        replies.append(Reply(f"```json\n{text}\n```" if index == 0 else text))
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve scripted chat completions on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (default: 8000)")
    args = parser.parse_args()
    with FakeOpenAIServer(demo_script(), port=args.port, repeat=True) as server:
        print(f"serving {len(_DEMO_LOSSES)} replies in a loop at {server.base_url}; Ctrl-C stops", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        print(f"{len(server.requests)} request(s) served", flush=True)


if __name__ == "__main__":
    main()
