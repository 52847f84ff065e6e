"""Parse a proposer's reply text into a proposal: thought, name and code.

Models rarely send exactly the one JSON object they are asked for, so the
parser accepts what they really send:

* JSON inside ```json fences or surrounded by prose;
* literal newlines and other control characters inside JSON strings;
* single-quoted Python dict syntax, read with `ast.literal_eval`, which
  evaluates literals only and never runs code;
* two objects back to back, where the first complete object is used and the
  rest is reported in `Proposal.ignored_text` and `Proposal.warnings`;
* a bare ```python block (or a reply that is only Python code) with no JSON,
  where the name comes from the first function definition, the thought is
  NO_THOUGHT and the prose around the block goes to `ignored_text`.

Names are normalised rather than rejected: they are lowercased, camelCase is
split with underscores, every character outside [a-z0-9_] becomes an
underscore, and the result is cut to 64 characters. A name is rejected only
when nothing valid is left. Every change is listed in `Proposal.warnings`.

An empty reply or one cut off before the object closed raises
`ReplyParseError` with kind EMPTY or TRUNCATED. Callers should treat those as
a failed model call and retry, not as a candidate.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from dataclasses import dataclass
from enum import Enum
from typing import Any

REQUIRED_KEYS = ("thought", "name", "code")
NAME_PATTERN = re.compile(r"[a-z0-9_]{1,64}")
MAX_NAME_LENGTH = 64
NO_THOUGHT = "(no thought given)"

# ast.literal_eval still builds a full syntax tree, so very long inputs are
# decoded as JSON only.
_LITERAL_EVAL_MAX_CHARS = 200_000
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]*\(", re.MULTILINE)
_PYTHON_FENCE_LANGUAGES = ("python", "py", "python3", "")
_REPLY_SHAPE = '{"thought": "...", "name": "...", "code": "..."}'


class ParseFailure(str, Enum):
    """Reason a reply could not be turned into a proposal."""

    EMPTY = "empty"  # nothing but whitespace: a failed model call
    TRUNCATED = "truncated"  # the object or code fence never closed: a failed model call
    MALFORMED = "malformed"  # no decodable object and no usable code block
    INVALID_FIELDS = "invalid_fields"  # an object was found but its fields are wrong


class ReplyFormat(str, Enum):
    """Form of reply that a proposal was read from."""

    JSON = "json"
    PYTHON_DICT = "python_dict"
    CODE_BLOCK = "code_block"


class ReplyParseError(ValueError):
    """Raised when a reply contains no usable proposal.

    `reason` is written to be sent back to the model in a repair prompt.
    """

    def __init__(self, reason: str, kind: ParseFailure) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class Proposal:
    """One proposal read from a reply.

    Attributes:
        thought: the idea behind the program, as the model wrote it.
        name: the normalised name, matching [a-z0-9_]{1,64}.
        code: the program source.
        format: which form of reply it was read from.
        warnings: what the parser repaired or ignored, for the log.
        ignored_text: text after the object that was used, such as a second object.
    """

    thought: str
    name: str
    code: str
    format: ReplyFormat = ReplyFormat.JSON
    warnings: tuple[str, ...] = ()
    ignored_text: str = ""


def parse_reply(text: str) -> Proposal:
    """Parse a reply into a proposal, or raise ReplyParseError with a reason for the model."""
    if text is None or not text.strip():
        raise ReplyParseError(
            f"reply was empty; send one JSON object {_REPLY_SHAPE}.", ParseFailure.EMPTY
        )

    found = _find_reply_object(text)
    if found.value is not None:
        return _proposal_from_object(text, found)

    # an unclosed object or fence means the model stopped early, so a retry
    # is more useful than reading a code block out of a partial reply
    if found.unclosed_at is not None or _has_unclosed_fence(text):
        raise ReplyParseError(
            f"reply was cut off before the JSON object was complete ({len(text)} characters received); "
            f"send the whole object {_REPLY_SHAPE} with shorter code or thought.",
            ParseFailure.TRUNCATED,
        )

    proposal = _proposal_from_code_block(text)
    if proposal is not None:
        return proposal

    if found.decode_error:
        raise ReplyParseError(
            f"reply contains an object that is not valid JSON ({found.decode_error}); "
            f"send one JSON object {_REPLY_SHAPE} with double-quoted keys and strings.",
            ParseFailure.MALFORMED,
        )
    raise ReplyParseError(
        f"reply contains no JSON object and no Python code block; send one JSON object {_REPLY_SHAPE}.",
        ParseFailure.MALFORMED,
    )


def is_empty_or_truncated(text: str) -> bool:
    """Return whether a reply is empty or cut off, meaning the model call should be retried."""
    try:
        parse_reply(text)
    except ReplyParseError as error:
        return error.kind in (ParseFailure.EMPTY, ParseFailure.TRUNCATED)
    return False


def normalize_name(raw: str) -> str:
    """Turn a proposed name into [a-z0-9_]{1,64}; return "" when nothing valid is left."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", raw.strip())
    name = name.lower()
    name = re.sub(r"[^a-z0-9_]+", "_", name)
    name = re.sub(r"_+", "_", name).strip("_")
    return name[:MAX_NAME_LENGTH].rstrip("_")


# finding the object


@dataclass
class _Found:
    """Result of scanning a reply for its object."""

    value: dict[str, Any] | None = None
    format: ReplyFormat = ReplyFormat.JSON
    end: int = 0
    unclosed_at: int | None = None
    decode_error: str = ""


def _find_reply_object(text: str) -> _Found:
    """Find the first balanced {...} span that decodes to a dict with a reply key."""
    found = _Found()
    position = 0
    while True:
        start = text.find("{", position)
        if start < 0:
            return found
        position = start + 1

        end = _match_brace(text, start)
        if end is None:
            if found.unclosed_at is None and _looks_like_object_start(text, start):
                found.unclosed_at = start
            continue

        span = text[start:end]
        value, reply_format, error = _decode_object(span)
        if isinstance(value, dict) and any(key in value for key in REQUIRED_KEYS):
            found.value, found.format, found.end = value, reply_format, end
            return found
        if error and not found.decode_error and _looks_like_object_start(text, start):
            found.decode_error = error


def _looks_like_object_start(text: str, start: int) -> bool:
    """Return whether the brace at `start` opens a keyed object rather than prose or code."""
    rest = text[start + 1 : start + 200].lstrip()
    return rest.startswith(('"', "'"))


def _match_brace(text: str, start: int) -> int | None:
    """Return the index just past the brace that closes text[start], or None if it never closes.

    Quotes of either kind, triple quotes and backslash escapes are honoured,
    so braces inside JSON strings or Python string literals do not count.
    """
    depth = 0
    index = start
    length = len(text)
    while index < length:
        char = text[index]
        if char in "\"'":
            index = _skip_string(text, index)
            if index is None:
                return None
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return None


def _skip_string(text: str, start: int) -> int | None:
    """Return the index just past the string literal opening at text[start], or None."""
    quote = text[start]
    triple = text.startswith(quote * 3, start)
    delimiter = quote * 3 if triple else quote
    index = start + len(delimiter)
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text.startswith(delimiter, index):
            return index + len(delimiter)
        index += 1
    return None


def _decode_object(span: str) -> tuple[Any, ReplyFormat, str]:
    """Decode one balanced span as JSON, then as a Python literal; return (value, format, error)."""
    try:
        # strict=False accepts raw newlines and tabs inside strings, which
        # models write when the code field spans several lines
        return json.loads(span, strict=False), ReplyFormat.JSON, ""
    except json.JSONDecodeError as error:
        json_error = f"{error.msg} at line {error.lineno} column {error.colno}"

    if len(span) <= _LITERAL_EVAL_MAX_CHARS:
        try:
            return ast.literal_eval(span), ReplyFormat.PYTHON_DICT, ""
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return None, ReplyFormat.JSON, json_error


def _has_unclosed_fence(text: str) -> bool:
    return text.count("```") % 2 == 1


# building the proposal


def _proposal_from_object(text: str, found: _Found) -> Proposal:
    value = found.value
    assert value is not None
    warnings: list[str] = []
    if found.format is ReplyFormat.PYTHON_DICT:
        warnings.append("reply used Python dict syntax instead of JSON")

    # a model sometimes puts the code in a fence after an object holding
    # only the thought and name
    if "code" not in value:
        block = _first_code_block(text[found.end :])
        if block is not None:
            value = {**value, "code": block}
            warnings.append("the object had no 'code' key, so the Python code block after it was used")

    problems = []
    fields: dict[str, str] = {}
    for key in REQUIRED_KEYS:
        if key not in value:
            problems.append(f"the key {key!r} is missing")
            continue
        field_value = value[key]
        if not isinstance(field_value, str):
            problems.append(f"{key!r} has type {type(field_value).__name__}, expected a string")
        elif not field_value.strip():
            problems.append(f"{key!r} is empty")
        else:
            fields[key] = field_value

    extra = sorted(str(key) for key in value if key not in REQUIRED_KEYS)
    if extra:
        warnings.append(f"ignored unexpected keys: {', '.join(extra)}")
    if problems:
        raise ReplyParseError(
            f"the reply object is invalid: {'; '.join(problems)}. "
            f"thought, name and code must all be non-empty strings, as in {_REPLY_SHAPE}.",
            ParseFailure.INVALID_FIELDS,
        )

    name = _validated_name(fields["name"], warnings)
    code = _clean_code(fields["code"], warnings)
    ignored = _ignored_tail(text[found.end :], warnings)
    return Proposal(
        thought=fields["thought"].strip(),
        name=name,
        code=code,
        format=found.format,
        warnings=tuple(warnings),
        ignored_text=ignored,
    )


def _proposal_from_code_block(text: str) -> Proposal | None:
    """Build a proposal from a Python code block or an all-code reply; None if there is none."""
    code = _first_code_block(text)
    prose = ""
    if code is not None:
        prose = _FENCE.sub(" ", text)
    elif _is_bare_python(text):
        code = text
    if code is None:
        return None

    function = _DEF.search(code)
    if function is None:
        return None
    warnings = ["reply had no JSON object, so its Python code block was used and named after its function"]
    name = normalize_name(function.group(1))
    if not name:
        return None
    return Proposal(
        thought=NO_THOUGHT,
        name=name,
        code=_clean_code(code, warnings),
        format=ReplyFormat.CODE_BLOCK,
        warnings=tuple(warnings),
        ignored_text=" ".join(prose.split()),
    )


def _first_code_block(text: str) -> str | None:
    """Return the first fenced Python block that defines a function, or None."""
    for match in _FENCE.finditer(text):
        language = match.group(1).lower()
        body = match.group(2)
        if language in _PYTHON_FENCE_LANGUAGES and _DEF.search(body):
            return body
    return None


def _is_bare_python(text: str) -> bool:
    stripped = text.strip()
    if not stripped.startswith(("import ", "from ", "def ", "@", "#")) or _DEF.search(stripped) is None:
        return False
    try:
        ast.parse(stripped)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _validated_name(raw: str, warnings: list[str]) -> str:
    name = normalize_name(raw)
    if not name:
        raise ReplyParseError(
            f"'name' is {raw!r}, which has no letters or digits; use a snake_case name "
            "of letters, digits and underscores, at most 64 characters.",
            ParseFailure.INVALID_FIELDS,
        )
    if name != raw:
        warnings.append(f"name {raw!r} was normalised to {name!r}")
    assert NAME_PATTERN.fullmatch(name)
    return name


def _clean_code(code: str, warnings: list[str]) -> str:
    """Remove a fence around the code, common indentation and doubly escaped newlines."""
    stripped = code.strip("\n")
    fenced = _FENCE.fullmatch(stripped.strip())
    if fenced is not None:
        stripped = fenced.group(2).strip("\n")
        warnings.append("removed a code fence inside the 'code' field")
    stripped = textwrap.dedent(stripped)

    # models sometimes escape twice, so the decoded code contains the two
    # characters backslash and n instead of line breaks
    if "\n" not in stripped and "\\n" in stripped and not _parses(stripped):
        unescaped = stripped.replace("\\n", "\n").replace("\\t", "\t").replace('\\"', '"')
        if _parses(unescaped):
            warnings.append("the code contained escaped newlines (\\n) instead of line breaks; they were decoded")
            stripped = unescaped
    return stripped.rstrip() + "\n"


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _ignored_tail(tail: str, warnings: list[str]) -> str:
    """Return the text after the used object, minus fence markers, and warn when it held another object."""
    remainder = tail.strip()
    if remainder.startswith("```"):
        remainder = remainder[3:].strip()
    if not remainder:
        return ""
    extra_objects = 0
    position = 0
    while True:
        start = remainder.find("{", position)
        if start < 0:
            break
        end = _match_brace(remainder, start)
        if end is None:
            break
        if _looks_like_object_start(remainder, start):
            extra_objects += 1
        position = end
    if extra_objects:
        warnings.append(f"ignored {extra_objects} more object(s) after the first one")
    return remainder
