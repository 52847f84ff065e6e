"""Reply parsing on the shapes of text that models really send."""

from __future__ import annotations

import json

import pytest

from engine.reply import (
    NAME_PATTERN,
    NO_THOUGHT,
    ParseFailure,
    ReplyFormat,
    ReplyParseError,
    is_empty_or_truncated,
    normalize_name,
    parse_reply,
)

CODE = (
    "import torch.nn.functional as F\n"
    "def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
    "    m = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
    "    return -F.logsigmoid(0.1 * m).clamp(max=5.0)\n"
)

# fenced JSON with prose around it, a raw newline inside the code string and
# a second object after the first
TWO_OBJECTS = (
    "Sure! Here is an improved objective.\n```json\n"
    '{"thought": "Blend logistic and hinge terms so confident pairs stop contributing.",\n'
    ' "name": "clipped_blend",\n'
    ' "code": "' + CODE.rstrip("\n") + '"}\n'
    "```\n"
    '{"thought": "alternative", "name": "second_try", "code": "..."}\n'
    "Let me know if you want more variants!\n"
)


def json_reply(thought: str = "Try a margin.", name: str = "margin_loss", code: str = CODE) -> str:
    return json.dumps({"thought": thought, "name": name, "code": code})


def parse_error(text: str) -> ReplyParseError:
    with pytest.raises(ReplyParseError) as caught:
        parse_reply(text)
    return caught.value


def test_first_of_two_objects_is_used():
    proposal = parse_reply(TWO_OBJECTS)

    assert proposal.name == "clipped_blend"
    assert proposal.thought == "Blend logistic and hinge terms so confident pairs stop contributing."
    assert proposal.code == CODE
    assert proposal.format is ReplyFormat.JSON
    assert proposal.ignored_text.startswith('{"thought": "alternative"')
    assert "Let me know" in proposal.ignored_text
    assert "ignored 1 more object(s) after the first one" in proposal.warnings


def test_plain_json_has_no_warnings():
    proposal = parse_reply(json_reply())

    assert proposal.name == "margin_loss"
    assert proposal.code == CODE
    assert proposal.warnings == ()
    assert proposal.ignored_text == ""


def test_fenced_json_with_prose():
    text = "Here is my idea.\n\n```json\n" + json_reply() + "\n```\n\nThis should train faster."

    proposal = parse_reply(text)

    assert proposal.name == "margin_loss"
    assert proposal.code == CODE
    assert proposal.ignored_text == "This should train faster."


def test_raw_control_characters_in_strings():
    # a literal tab and newlines inside the JSON strings, which strict JSON rejects
    text = '{"thought": "Tab\there.", "name": "tabbed", "code": "def f(x):\n\treturn x\n"}'

    proposal = parse_reply(text)

    assert proposal.thought == "Tab\there."
    assert proposal.code == "def f(x):\n\treturn x\n"


def test_single_quoted_python_dict():
    text = "{'thought': 'Use a hinge.', 'name': 'hinge', 'code': '''def f(x):\n    return x\n''',}"

    proposal = parse_reply(text)

    assert proposal.format is ReplyFormat.PYTHON_DICT
    assert proposal.name == "hinge"
    assert proposal.code == "def f(x):\n    return x\n"
    assert "reply used Python dict syntax instead of JSON" in proposal.warnings


def test_python_dict_is_never_evaluated_as_code():
    # a call is not a literal, so ast.literal_eval rejects it instead of running it
    text = "{'thought': 'x', 'name': 'y', 'code': __import__('os').getcwd()}"

    error = parse_error(text)

    assert error.kind is ParseFailure.MALFORMED


def test_bare_python_block_without_json():
    text = "I would try this:\n```python\nimport torch\n\ndef ClippedLogistic(self, a, b, c, d):\n    return a\n```\n"

    proposal = parse_reply(text)

    assert proposal.format is ReplyFormat.CODE_BLOCK
    assert proposal.name == "clipped_logistic"
    assert proposal.thought == NO_THOUGHT
    assert proposal.code == "import torch\n\ndef ClippedLogistic(self, a, b, c, d):\n    return a\n"
    assert proposal.ignored_text == "I would try this:"


def test_reply_that_is_only_code():
    text = "import torch\n\ndef sigmoid_loss(self, a, b, c, d):\n    return torch.sigmoid(a - b)\n"

    proposal = parse_reply(text)

    assert proposal.format is ReplyFormat.CODE_BLOCK
    assert proposal.name == "sigmoid_loss"
    assert proposal.code == text


def test_code_block_after_object_without_code():
    text = '{"thought": "Exponential tail.", "name": "exp_tail"}\n```python\ndef exp_tail(x):\n    return x\n```'

    proposal = parse_reply(text)

    assert proposal.name == "exp_tail"
    assert proposal.code == "def exp_tail(x):\n    return x\n"
    assert any("no 'code' key" in warning for warning in proposal.warnings)


def test_truncated_object_is_reported():
    text = "```json\n" + json_reply()[:-40]

    error = parse_error(text)

    assert error.kind is ParseFailure.TRUNCATED
    assert error.reason.startswith("reply was cut off")
    assert is_empty_or_truncated(text)


def test_unclosed_fence_is_truncated():
    text = "Here it is:\n```python\nimport torch\n"

    assert parse_error(text).kind is ParseFailure.TRUNCATED


def test_truncated_second_object_is_ignored():
    text = json_reply() + '\n{"thought": "another", "name": "cut'

    proposal = parse_reply(text)

    assert proposal.name == "margin_loss"
    assert not is_empty_or_truncated(text)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_reply_is_flagged(text):
    error = parse_error(text)

    assert error.kind is ParseFailure.EMPTY
    assert is_empty_or_truncated(text)


def test_prose_only_reply_is_malformed_not_truncated():
    text = "I think a hinge loss would be good here, but I'm not sure how to write it."

    error = parse_error(text)

    assert error.kind is ParseFailure.MALFORMED
    assert "no JSON object" in error.reason
    assert not is_empty_or_truncated(text)


def test_invalid_json_reports_decoder_position():
    text = '{"thought": "x" "name": "y", "code": "z"}'

    error = parse_error(text)

    assert error.kind is ParseFailure.MALFORMED
    assert "not valid JSON" in error.reason
    assert "line 1 column 17" in error.reason


def test_missing_key_is_named():
    error = parse_error('{"thought": "Idea.", "name": "no_code"}')

    assert error.kind is ParseFailure.INVALID_FIELDS
    assert "the key 'code' is missing" in error.reason


def test_every_field_problem_is_reported_at_once():
    error = parse_error('{"thought": "", "name": 42}')

    assert "'thought' is empty" in error.reason
    assert "'name' has type int, expected a string" in error.reason
    assert "the key 'code' is missing" in error.reason


def test_unexpected_keys_are_ignored_with_warning():
    text = json.dumps({"thought": "t", "name": "n", "code": CODE, "confidence": 0.9})

    proposal = parse_reply(text)

    assert "ignored unexpected keys: confidence" in proposal.warnings


def test_braces_inside_strings_do_not_end_the_object():
    code = 'def f(x):\n    table = {"a": 1, "}": 2}\n    return x\n'
    text = "Prose with {beta} in braces. " + json_reply(code=code)

    proposal = parse_reply(text)

    assert proposal.code == code


def test_fence_inside_code_field_is_removed():
    proposal = parse_reply(json_reply(code="```python\n" + CODE + "```"))

    assert proposal.code == CODE
    assert "removed a code fence inside the 'code' field" in proposal.warnings


def test_doubly_escaped_newlines_are_decoded():
    escaped = CODE.replace("\n", "\\n")

    proposal = parse_reply(json_reply(code=escaped))

    assert proposal.code == CODE


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("clipped_blend", "clipped_blend"),
        ("Clipped Blend-V2", "clipped_blend_v2"),
        ("ClippedBlend", "clipped_blend"),
        ("  __logistic__  ", "logistic"),
        ("ipo/hinge mix", "ipo_hinge_mix"),
        ("x" * 100, "x" * 64),
        ("!!!", ""),
        ("σ-loss", "loss"),
    ],
)
def test_normalize_name(raw, expected):
    assert normalize_name(raw) == expected


def test_changed_name_is_logged():
    proposal = parse_reply(json_reply(name="My Loss"))

    assert proposal.name == "my_loss"
    assert NAME_PATTERN.fullmatch(proposal.name)
    assert "name 'My Loss' was normalised to 'my_loss'" in proposal.warnings


def test_name_without_letters_or_digits_is_rejected():
    error = parse_error(json_reply(name="???"))

    assert error.kind is ParseFailure.INVALID_FIELDS
    assert "'???'" in error.reason
