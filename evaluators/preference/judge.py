"""An LLM judge behind any OpenAI-compatible endpoint, with a persistent cache of its verdicts.

The judge runs in the engine process, never in a sandbox worker: workers
have no network, and the API key must stay out of reach of candidate code.
The key is read from the environment and never stored or logged.

Two kinds of failure are handled differently:

- Transport errors (429, 5xx, timeouts, connection errors, bodies that are
  not chat completions) are retried with exponential backoff and jitter,
  honouring Retry-After, as `engine.openai_proposer` does. When the retries
  are spent, `JudgeUnavailable` names the URL and the last error.
- A reply without a usable verdict (no "[[N]]", a rating outside 1 to 10,
  conflicting verdicts, a refusal, an empty reply) is asked again once, with
  a reminder of the format. A second unusable reply makes the judgement
  unparseable: the caller excludes it from the score and counts it.

Every parsed verdict is stored in a SQLite file keyed by the judge model,
the prompt version, the sampling temperature and a hash of the exact
messages (so of the exact answers), and a repeated judgement sends no request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception

from engine.openai_proposer import MalformedResponse, describe, is_retryable, retry_after_s
from evaluators.preference.judge_prompts import PromptTemplate, Verdict, Winner, parser_for, reminder

logger = logging.getLogger(__name__)

JUDGE_CACHE_FILE = "judgements.sqlite"


class JudgeUnavailable(RuntimeError):
    """Raised when the judge endpoint keeps failing or rejects a request; the message names the URL and the error."""


@dataclass(frozen=True)
class JudgeConfig:
    """Which model judges and how its endpoint is called.

    Attributes:
        model: model name at the endpoint. The DiscoPOP study graded MT-Bench
            with GPT-4 through FastChat.
        base_url: endpoint URL such as http://127.0.0.1:8000/v1; empty for OpenAI's.
        api_key_env: environment variable that contains the API key. A local
            endpoint given by `base_url` may need none.
        temperature: sampling temperature of the judge; FastChat grades at 0.
        max_tokens: completion token limit per judgement (FastChat: 2048).
        timeout_s: seconds to wait for one HTTP response.
        max_retries: retries of one request after transport errors.
        retry_base_s: first backoff wait in seconds; it doubles per retry, with jitter.
        retry_max_s: longest backoff wait in seconds, also the cap on Retry-After.
        workers: judgements sent at the same time.
    """

    model: str = "gpt-4"
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 6
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    workers: int = 4

    def __post_init__(self) -> None:
        errors = []
        if not self.model.strip():
            errors.append("model is empty; name the judge model, such as gpt-4")
        for name in ("max_tokens", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)!r} is invalid; expected an integer >= 1")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            errors.append(f"max_retries={self.max_retries!r} is invalid; expected an integer >= 0")
        for name in ("timeout_s", "retry_max_s"):
            if not getattr(self, name) > 0:
                errors.append(f"{name}={getattr(self, name)!r} is invalid; expected a number > 0")
        for name in ("temperature", "retry_base_s"):
            if not getattr(self, name) >= 0:
                errors.append(f"{name}={getattr(self, name)!r} is invalid; expected a number >= 0")
        if errors:
            raise ValueError("invalid judge settings:\n  " + "\n  ".join(errors))


@dataclass
class JudgeUsage:
    """Requests and tokens the judge endpoint billed in this process."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JudgeClient:
    """Sends chat requests to the judge endpoint and retries transport errors."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        api_key = os.environ.get(config.api_key_env, "")
        if not api_key and not config.base_url:
            raise ValueError(
                f"no API key for the judge: set the environment variable {config.api_key_env} or pass "
                "--judge-url for a local endpoint that needs none"
            )
        self.config = config
        self.url = config.base_url or "https://api.openai.com/v1"
        self.usage = JudgeUsage()
        self._sleep = sleep
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._client = openai.OpenAI(
            api_key=api_key or "not-needed",
            base_url=config.base_url or None,
            timeout=config.timeout_s,
            max_retries=0,
        )

    def complete(self, messages: list[dict[str, str]]) -> str:
        """Return the text of the judge's reply; raise JudgeUnavailable once the retries are spent."""
        errors: list[str] = []
        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=lambda state: state.attempt_number > self.config.max_retries,
            wait=self._wait,
            before_sleep=lambda state: self._before_retry(state, errors),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(self._request, messages, errors)
        except (openai.APIError, MalformedResponse) as error:
            last = describe(error, self.config.timeout_s)
            if is_retryable(error):
                why = f"failed after {len(errors)} request(s)"
                fix = "Check that the server is running and reachable, or raise --judge-retries"
            else:
                why = "rejected the request"
                fix = f"Check the URL, the model name and the API key (variable {self.config.api_key_env})"
            raise JudgeUnavailable(
                f"the judge endpoint {self.url} (model {self.config.model}) {why}. Last error: {last}. {fix}."
            ) from None

    def _request(self, messages: list[dict[str, str]], errors: list[str]) -> str:
        with self._lock:
            self.usage.requests += 1
        try:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=messages,
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
            )
        except (json.JSONDecodeError, openai.APIResponseValidationError) as error:
            errors.append(f"malformed body ({error})")
            raise MalformedResponse(f"the response body is not a valid chat completion ({error})") from None
        except openai.APIError as error:
            errors.append(describe(error, self.config.timeout_s))
            raise
        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            errors.append("the response has no choices")
            raise MalformedResponse("the response has no choices")
        usage = getattr(response, "usage", None)
        with self._lock:
            self.usage.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.usage.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
        return choices[0].message.content or ""

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        hinted = retry_after_s(error)
        if hinted is not None:
            return min(hinted, self.config.retry_max_s)
        exponential = self.config.retry_base_s * (2 ** (state.attempt_number - 1))
        return min(self.config.retry_max_s, exponential * (0.5 + self._rng.random()))

    def _before_retry(self, state: RetryCallState, errors: list[str]) -> None:
        with self._lock:
            self.usage.retries += 1
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.info(
            "judge request to %s (model %s) failed: %s; retrying in %.2f s",
            self.url,
            self.config.model,
            errors[-1] if errors else "unknown error",
            wait,
        )


class JudgementCache:
    """Parsed verdicts in a SQLite file, keyed by judge model, prompt version, temperature and messages."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        with self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, judge_model TEXT NOT NULL, "
                "prompt_version TEXT NOT NULL, verdict TEXT NOT NULL, reply TEXT NOT NULL, created_at REAL NOT NULL)"
            )

    @staticmethod
    def key(judge_model: str, prompt_version: str, temperature: float, messages: list[dict[str, str]]) -> str:
        payload = json.dumps(
            {"model": judge_model, "prompt": prompt_version, "temperature": temperature, "messages": messages},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> tuple[Any, str] | None:
        """Return the stored verdict value and reply text, or None."""
        with self._lock:
            row = self._db.execute("SELECT verdict, reply FROM judgements WHERE key=?", (key,)).fetchone()
        return None if row is None else (json.loads(row[0]), row[1])

    def put(self, key: str, judge_model: str, prompt_version: str, value: Any, reply: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO judgements(key, judge_model, prompt_version, verdict, reply, created_at) "
                "VALUES(?, ?, ?, ?, ?, ?)",
                (key, judge_model, prompt_version, json.dumps(value), reply, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class JudgementStatus(str, Enum):
    PARSED = "parsed"
    UNPARSEABLE = "unparseable"


@dataclass(frozen=True)
class Judgement:
    """The outcome of one judgement.

    Attributes:
        value: the rating (float) or the Winner; None when unparseable.
        status: parsed, or unparseable after the reminder.
        problem: the VerdictProblem value of the last reply when unparseable, else "".
        detail: why the last reply was unusable, else "".
        reply: the judge's last reply text.
        requests: chat requests this judgement sent, 0 when it came from the cache.
        cached: whether the verdict came from the cache.
    """

    value: float | Winner | None
    status: JudgementStatus
    problem: str = ""
    detail: str = ""
    reply: str = ""
    requests: int = 0
    cached: bool = False


class Judge:
    """Asks the judge for verdicts, with one reminder after an unusable reply, and caches the parsed ones."""

    def __init__(self, client: JudgeClient, cache: JudgementCache | None = None) -> None:
        self.client = client
        self.cache = cache

    @property
    def model(self) -> str:
        return self.client.config.model

    def judge(self, template: PromptTemplate, fields: dict[str, str]) -> Judgement:
        """Fill a template, ask for a verdict and parse it."""
        messages = template.messages(**fields)
        parse = parser_for(template)
        key = JudgementCache.key(self.model, template.version, self.client.config.temperature, messages)
        if self.cache is not None:
            stored = self.cache.get(key)
            if stored is not None:
                value, reply = stored
                return Judgement(_decode(value), JudgementStatus.PARSED, reply=reply, cached=True)

        reply = self.client.complete(messages)
        verdict = parse(reply)
        requests = 1
        if verdict.value is None:
            logger.info("judge reply without a usable verdict (%s); asking again with a reminder", verdict.detail)
            follow_up = [
                *messages,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": reminder(template, verdict)},
            ]
            reply = self.client.complete(follow_up)
            verdict = parse(reply)
            requests = 2
        if verdict.value is None:
            return _unparseable(verdict, reply, requests)
        if self.cache is not None:
            self.cache.put(key, self.model, template.version, _encode(verdict.value), reply)
        return Judgement(verdict.value, JudgementStatus.PARSED, reply=reply, requests=requests)

    def judge_all(self, requests: list[tuple[PromptTemplate, dict[str, str]]]) -> list[Judgement]:
        """Judge every (template, fields) pair, `workers` at a time, and return the judgements in order."""
        workers = self.client.config.workers
        if workers == 1 or len(requests) <= 1:
            return [self.judge(template, fields) for template, fields in requests]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            return list(pool.map(lambda request: self.judge(*request), requests))


def _unparseable(verdict: Verdict, reply: str, requests: int) -> Judgement:
    problem = verdict.problem.value if verdict.problem else ""
    return Judgement(None, JudgementStatus.UNPARSEABLE, problem, verdict.detail, reply, requests)


def _encode(value: float | Winner) -> Any:
    return {"winner": value.value} if isinstance(value, Winner) else value


def _decode(value: Any) -> float | Winner:
    return Winner(value["winner"]) if isinstance(value, dict) else float(value)


def open_judge(config: JudgeConfig, cache_dir: Path | None) -> Judge:
    """Return a Judge for `config` whose cache lives in cache_dir/judgements.sqlite (no cache when None)."""
    cache = JudgementCache(Path(cache_dir) / JUDGE_CACHE_FILE) if cache_dir is not None else None
    return Judge(JudgeClient(config), cache)
