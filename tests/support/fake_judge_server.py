"""A scripted judge on 127.0.0.1 whose replies may depend on the request.

`FakeJudgeServer` serves the steps of its script first, like
`FakeOpenAIServer`, and then asks `responder(messages)` for each further
request. A responder can grade by content, so concurrent requests get
the right verdicts whatever order they arrive in.

    def grade(messages):
        return Reply("Fine answer. Rating: [[7]]")

    with FakeJudgeServer(grade, script=[Fault(500)]) as server:
        ...  # the first request gets a 500, every later one a rating of 7
"""

from __future__ import annotations

import re
from typing import Any, Callable

from tests.support.fake_openai_server import FakeOpenAIServer, LoggedRequest, Reply, Step, prompt_chars

Responder = Callable[[list[dict[str, Any]]], Step]


class FakeJudgeServer(FakeOpenAIServer):
    """Serves the script, then the responder's step for each request."""

    def __init__(self, responder: Responder, script: list[Step] | None = None) -> None:
        super().__init__(list(script or []))
        self._responder = responder

    def _next(self, body: dict[str, Any], headers: dict[str, str]) -> LoggedRequest:
        messages = list(body.get("messages") or [])
        with self._lock:
            step = self._script.pop(0) if self._script else self._responder(messages)
            logged = LoggedRequest(
                index=len(self.requests),
                model=str(body.get("model", "")),
                messages=messages,
                temperature=body.get("temperature"),
                max_tokens=body.get("max_tokens", body.get("max_completion_tokens")),
                step=step,
                body=body,
                headers=headers,
            )
            if isinstance(step, Reply):
                logged.prompt_tokens = prompt_chars(messages) // 4
                logged.completion_tokens = len(step.content) // 4
            self.requests.append(logged)
            self._arrived.notify_all()
            return logged


def user_text(messages: list[dict[str, Any]]) -> str:
    """Return the first user message of a request, where the judge templates put the answers."""
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")


def marked_rating(messages: list[dict[str, Any]], default: int = 5) -> Reply:
    """Grade an answer by the marker "score=N" it contains (the last one in the prompt), else `default`."""
    found = re.findall(r"score=(\d+)", user_text(messages))
    return Reply(f"The answer is adequate. Rating: [[{found[-1] if found else default}]]")
