"""Judge prompt templates and the parsers of the verdicts they ask for.

The templates use the fields and placeholders of FastChat's MT-Bench file
`fastchat/llm_judge/data/judge_prompts.jsonl` (lm-sys/FastChat): `name`,
`type`, `system_prompt`, `prompt_template` and `output_format`, with
placeholders such as `{question}`, `{answer}`, `{ref_answer_1}` or
`{question_2}`. The built-in templates are worded for this project. Scores
are therefore comparable with published MT-Bench numbers only when the user
passes FastChat's own file with `load_judge_prompts`.

Single-answer grading asks for "Rating: [[5]]" on a scale of 1 to 10.
Pairwise comparison asks for "[[A]]", "[[B]]" or "[[C]]" (a tie).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class VerdictFormat(str, Enum):
    """What a template asks the judge to end its reply with."""

    RATING = "[[rating]]"
    PREFERENCE = "[[A]]"


class VerdictProblem(str, Enum):
    """Reason a judge reply gave no usable verdict."""

    EMPTY = "empty"
    MISSING = "missing"
    REFUSAL = "refusal"
    OUT_OF_RANGE = "out_of_range"
    CONFLICTING = "conflicting"


class Winner(str, Enum):
    """Verdict of a pairwise comparison, by position in the prompt."""

    A = "A"
    B = "B"
    TIE = "tie"


@dataclass(frozen=True)
class Verdict:
    """A parsed verdict: a rating (float) or a Winner, or the problem that prevented one."""

    value: float | Winner | None
    problem: VerdictProblem | None = None
    detail: str = ""


@dataclass(frozen=True)
class PromptTemplate:
    """One judge prompt, in the fields of FastChat's judge_prompts.jsonl."""

    name: str
    system_prompt: str
    prompt_template: str
    output_format: VerdictFormat

    @property
    def version(self) -> str:
        """Return the name plus a hash of the wording, so that a reworded template never reuses cached verdicts."""
        digest = hashlib.sha256((self.system_prompt + "\x00" + self.prompt_template).encode()).hexdigest()[:12]
        return f"{self.name}@{digest}"

    def messages(self, **fields: str) -> list[dict[str, str]]:
        """Return the chat messages of this prompt with its placeholders filled."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.prompt_template.format(**fields)},
        ]


@dataclass(frozen=True)
class JudgePrompts:
    """The templates one evaluation uses.

    Attributes:
        single: grades the answer to a first turn.
        single_reference: the same, given a reference answer (math, reasoning
            and coding questions with a `reference` field).
        multi_turn: grades the second answer, given the whole conversation.
        multi_turn_reference: the same, given reference answers to both turns.
        pairwise: picks the better of two answers to a first turn.
    """

    single: PromptTemplate
    single_reference: PromptTemplate
    multi_turn: PromptTemplate
    multi_turn_reference: PromptTemplate
    pairwise: PromptTemplate


_RATING_RULE = (
    "After the explanation, rate the response on a scale of 1 to 10 and end your reply with the rating in "
    'exactly this form: "Rating: [[5]]".'
)
_GENERAL_CRITERIA = (
    "Judge how helpful, relevant, accurate, deep, creative and detailed the response is. "
    "Start with a short explanation and stay objective."
)
_REFERENCE_CRITERIA = (
    "Judge correctness first, then helpfulness. You are given a reference answer: compare the assistant's "
    "answer with it and point out every mistake in a short explanation. Stay objective."
)
_GRADER = "You are a strict and impartial judge of answers written by an AI assistant."

BUILTIN_PROMPTS = JudgePrompts(
    single=PromptTemplate(
        name="evolve-single-v1",
        system_prompt=_GRADER,
        prompt_template=(
            f"{_GENERAL_CRITERIA} {_RATING_RULE}\n\n"
            "[Question]\n{question}\n\n[Assistant's answer]\n{answer}\n[End of the assistant's answer]"
        ),
        output_format=VerdictFormat.RATING,
    ),
    single_reference=PromptTemplate(
        name="evolve-single-reference-v1",
        system_prompt=_GRADER,
        prompt_template=(
            f"{_REFERENCE_CRITERIA} {_RATING_RULE}\n\n"
            "[Question]\n{question}\n\n[Reference answer]\n{ref_answer_1}\n[End of the reference answer]\n\n"
            "[Assistant's answer]\n{answer}\n[End of the assistant's answer]"
        ),
        output_format=VerdictFormat.RATING,
    ),
    multi_turn=PromptTemplate(
        name="evolve-single-multi-turn-v1",
        system_prompt=f"{_GRADER} Grade only the assistant's answer to the second question. {_GENERAL_CRITERIA} "
        f"{_RATING_RULE}",
        prompt_template=(
            "[Conversation]\n### User:\n{question_1}\n\n### Assistant:\n{answer_1}\n\n"
            "### User:\n{question_2}\n\n### Assistant:\n{answer_2}\n[End of the conversation]"
        ),
        output_format=VerdictFormat.RATING,
    ),
    multi_turn_reference=PromptTemplate(
        name="evolve-single-reference-multi-turn-v1",
        system_prompt=f"{_GRADER} Grade only the assistant's answer to the second question. {_REFERENCE_CRITERIA} "
        f"{_RATING_RULE}",
        prompt_template=(
            "[Reference answers]\n### User:\n{question_1}\n\n### Reference:\n{ref_answer_1}\n\n"
            "### User:\n{question_2}\n\n### Reference:\n{ref_answer_2}\n[End of the reference answers]\n\n"
            "[Conversation]\n### User:\n{question_1}\n\n### Assistant:\n{answer_1}\n\n"
            "### User:\n{question_2}\n\n### Assistant:\n{answer_2}\n[End of the conversation]"
        ),
        output_format=VerdictFormat.RATING,
    ),
    pairwise=PromptTemplate(
        name="evolve-pairwise-v1",
        system_prompt=(
            "You are an impartial judge comparing two AI assistants' answers to the same user request. Pick the "
            "answer that follows the instructions and helps the user more. The order of the answers and their "
            "length must not sway you. Explain the comparison briefly, then end your reply with exactly one "
            'verdict: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie.'
        ),
        prompt_template=(
            "[User request]\n{question}\n\n[Assistant A's answer]\n{answer_a}\n[End of assistant A's answer]\n\n"
            "[Assistant B's answer]\n{answer_b}\n[End of assistant B's answer]"
        ),
        output_format=VerdictFormat.PREFERENCE,
    ),
)

# Template names in FastChat's judge_prompts.jsonl, by JudgePrompts field.
FASTCHAT_TEMPLATE_NAMES = {
    "single": "single-v1",
    "single_reference": "single-math-v1",
    "multi_turn": "single-v1-multi-turn",
    "multi_turn_reference": "single-math-v1-multi-turn",
    "pairwise": "pair-v2",
}


def load_judge_prompts(path: Path) -> JudgePrompts:
    """Read templates from a file in the format of FastChat's judge_prompts.jsonl.

    Raises:
        ValueError: naming the file and every missing template or invalid line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"judge prompt file {path} cannot be read ({error}); pass FastChat's judge_prompts.jsonl") from None
    records, problems = {}, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[record["name"]] = record
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            problems.append(f"line {number}: not a JSON object with a 'name' ({error})")
    templates = {}
    for field, name in FASTCHAT_TEMPLATE_NAMES.items():
        record = records.get(name)
        if record is None:
            problems.append(f"template {name!r} is missing")
            continue
        try:
            templates[field] = PromptTemplate(
                name=name,
                system_prompt=str(record["system_prompt"]),
                prompt_template=str(record["prompt_template"]),
                output_format=VerdictFormat(record["output_format"]),
            )
        except (KeyError, ValueError) as error:
            problems.append(f"template {name!r}: missing or invalid field ({error})")
    if problems:
        raise ValueError(f"judge prompt file {path} is not usable:\n  - " + "\n  - ".join(problems))
    return JudgePrompts(**templates)


# FastChat also accepts a single-bracket "[5]" when "[[5]]" is missing. These
# parsers do not, because "[1]" is often a citation; the judge is asked again.
_RATING = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]")
_PREFERENCE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# A heuristic that only labels the problem: a reply without a verdict is unparseable either way.
_REFUSAL = re.compile(r"\b(I can(?:no|')t|I am unable|I'm unable|I won't|I will not|I'm sorry|I apologi[sz]e)\b", re.I)


def _missing(text: str, expected: str) -> Verdict:
    if not text.strip():
        return Verdict(None, VerdictProblem.EMPTY, "the reply was empty")
    if _REFUSAL.search(text):
        return Verdict(None, VerdictProblem.REFUSAL, f"the reply looks like a refusal and contains no {expected}")
    return Verdict(None, VerdictProblem.MISSING, f"the reply contains no {expected}")


def parse_rating(text: str) -> Verdict:
    """Return the rating of a reply that ends with "Rating: [[N]]", N from 1 to 10."""
    found = _RATING.findall(text)
    if not found:
        return _missing(text, 'rating in the form "[[N]]"')
    values = sorted({float(value) for value in found})
    if len(values) > 1:
        shown = " and ".join(f"[[{value:g}]]" for value in values)
        return Verdict(None, VerdictProblem.CONFLICTING, f"the reply contains conflicting ratings {shown}")
    if not 1.0 <= values[0] <= 10.0:
        return Verdict(None, VerdictProblem.OUT_OF_RANGE, f"the rating [[{values[0]:g}]] is outside 1 to 10")
    return Verdict(values[0])


def parse_preference(text: str) -> Verdict:
    """Return the winner of a reply that ends with [[A]], [[B]] or [[C]] (a tie)."""
    found = set(_PREFERENCE.findall(text))
    if not found:
        return _missing(text, "verdict [[A]], [[B]] or [[C]]")
    if len(found) > 1:
        shown = " and ".join(f"[[{label}]]" for label in sorted(found))
        return Verdict(None, VerdictProblem.CONFLICTING, f"the reply contains conflicting verdicts {shown}")
    label = found.pop()
    return Verdict(Winner.TIE if label == "C" else Winner(label))


def reminder(template: PromptTemplate, verdict: Verdict) -> str:
    """Return the follow-up message that asks again after a reply without a usable verdict."""
    if template.output_format is VerdictFormat.RATING:
        form = 'the rating in exactly this form: "Rating: [[5]]", with a number from 1 to 10'
    else:
        form = 'exactly one verdict: "[[A]]", "[[B]]" or "[[C]]" for a tie'
    return f"Your reply could not be used because {verdict.detail}. Give your verdict again and end it with {form}."


def parser_for(template: PromptTemplate):
    """Return the verdict parser of a template's output format."""
    return parse_rating if template.output_format is VerdictFormat.RATING else parse_preference
