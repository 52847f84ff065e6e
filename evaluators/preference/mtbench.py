"""MT-Bench-style fitness: a policy answers two-turn questions and a judge grades each answer from 1 to 10.

This follows MT-Bench (Zheng et al. 2023, "Judging LLM-as-a-Judge with
MT-Bench and Chatbot Arena") as FastChat's llm_judge scripts run it. The
DiscoPOP study used that score as its discovery fitness. The second turn's
prompt contains the model's own first answer. Each turn is graded on its
own with single-answer grading, and questions of the math, reasoning and
coding categories are graded against a reference answer. The score is the
mean of all valid grades of both turns.

Questions come from a JSONL file in the format of MT-Bench's question.jsonl
(`question_id`, `category`, `turns`, optional `reference`). The project
ships a small set of its own in data/mt_questions.jsonl. FastChat grades
against GPT-4's answers in reference_answer/gpt-4.jsonl instead of the
`reference` field; `load_reference_answers` reads that file. Generation runs in
the sandbox worker (`generate_answers`), grading in the engine (`grade_answers`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from evaluators.preference.judge import Judge, Judgement, JudgementStatus
from evaluators.preference.judge_prompts import BUILTIN_PROMPTS, JudgePrompts

BUNDLED_QUESTIONS = Path(__file__).with_name("data") / "mt_questions.jsonl"

# Categories graded against a reference answer, as FastChat's NEED_REF_CATS.
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")

# Sampling temperature of each MT-Bench category, and of any other category,
# as in FastChat's llm_judge/common.py `temperature_config` and gen_model_answer.py.
CATEGORY_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
DEFAULT_TEMPERATURE = 0.7


@dataclass(frozen=True)
class Question:
    """One multi-turn question; `reference` contains a reference answer per turn ("" for none), or is empty."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Question:
        return cls(values["question_id"], values["category"], tuple(values["turns"]), tuple(values.get("reference") or ()))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "turns": list(self.turns), "reference": list(self.reference)}


@dataclass(frozen=True)
class Answer:
    """A model's answers to the turns of one question, in order."""

    question_id: int | str
    turns: tuple[str, ...]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Answer:
        return cls(values["question_id"], tuple(values["turns"]))

    def to_dict(self) -> dict[str, Any]:
        return {"question_id": self.question_id, "turns": list(self.turns)}


def load_questions(path: Path = BUNDLED_QUESTIONS) -> list[Question]:
    """Read questions from a JSONL file in MT-Bench's question.jsonl format.

    Raises:
        ValueError: naming the file and every invalid line at once.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"question file {path} cannot be read ({error}); pass a JSONL file of questions") from None
    questions, problems, seen = [], [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not valid JSON ({error})")
            continue
        problem = _question_problem(values)
        if problem:
            problems.append(f"line {number}: {problem}")
            continue
        question = Question.from_dict(values)
        if question.question_id in seen:
            problems.append(f"line {number}: question_id {question.question_id!r} appears twice")
            continue
        seen.add(question.question_id)
        questions.append(question)
    if not questions and not problems:
        problems.append("the file contains no questions")
    if problems:
        raise ValueError(f"question file {path} is invalid:\n  - " + "\n  - ".join(problems))
    return questions


def load_reference_answers(path: Path, questions: Sequence[Question]) -> list[Question]:
    """Return the questions with `reference` replaced by the answers of a FastChat model-answer file.

    The file has one JSON object per line with `question_id` and `choices`,
    whose first entry's `turns` are the reference answers, as FastChat's
    reference_answer/gpt-4.jsonl. Questions the file does not cover keep their own reference.

    Raises:
        ValueError: naming the file and every invalid line at once.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"reference answer file {path} cannot be read ({error})") from None
    references, problems = {}, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
            turns = values["choices"][0]["turns"]
            if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
                raise TypeError("turns is not a list of strings")
            references[values["question_id"]] = tuple(turns)
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
            problems.append(f"line {number}: expected question_id and choices[0].turns ({type(error).__name__}: {error})")
    if problems:
        raise ValueError(f"reference answer file {path} is invalid:\n  - " + "\n  - ".join(problems))
    updated = []
    for question in questions:
        reference = references.get(question.question_id)
        if reference is not None:
            padded = (reference + ("",) * len(question.turns))[: len(question.turns)]
            question = Question(question.question_id, question.category, question.turns, padded)
        updated.append(question)
    return updated


def _question_problem(values: Any) -> str:
    if not isinstance(values, dict):
        return "expected a JSON object"
    missing = [key for key in ("question_id", "category", "turns") if key not in values]
    if missing:
        return f"missing field(s) {missing}; expected question_id, category and turns"
    turns = values["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        return "turns must be a non-empty list of non-empty strings"
    if len(turns) > 2:
        return f"{len(turns)} turns; MT-Bench grading covers one or two turns"
    reference = values.get("reference")
    if reference is not None and (
        not isinstance(reference, list) or len(reference) != len(turns) or not all(isinstance(r, str) for r in reference)
    ):
        return "reference must be a list of strings with one entry per turn"
    return ""


def conversation(question: Question, answers: Sequence[str]) -> list[dict[str, str]]:
    """Return the chat messages that ask turn len(answers) + 1, with the earlier answers as assistant turns."""
    messages = []
    for turn, answer in zip(question.turns, answers):
        messages.append({"role": "user", "content": turn})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": question.turns[len(answers)]})
    return messages


def generate_answers(
    model, tokenizer, questions: Sequence[Question], *, max_new_tokens: int, batch_size: int, seed: int
) -> list[Answer]:
    """Answer every turn of every question with the model's chat template, one turn at a time.

    Each turn is sampled at its category's temperature (greedy at 0) and
    batched with other questions of the same temperature. The random seed is
    reset per batch, so answers do not depend on which batches ran before.
    """
    from evaluators.preference.chat import complete_chats

    answers: dict[int, list[str]] = {index: [] for index in range(len(questions))}
    for turn in range(max(len(question.turns) for question in questions)):
        pending = [index for index, question in enumerate(questions) if len(question.turns) > turn]
        by_temperature: dict[float, list[int]] = {}
        for index in pending:
            temperature = CATEGORY_TEMPERATURES.get(questions[index].category, DEFAULT_TEMPERATURE)
            by_temperature.setdefault(temperature, []).append(index)
        for temperature, indices in sorted(by_temperature.items()):
            chats = [conversation(questions[index], answers[index]) for index in indices]
            texts = complete_chats(
                model,
                tokenizer,
                chats,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                batch_size=batch_size,
                seed=seed + turn,
            )
            for index, text in zip(indices, texts):
                answers[index].append(text)
    return [Answer(question.question_id, tuple(answers[index])) for index, question in enumerate(questions)]


@dataclass(frozen=True)
class TurnGrade:
    """The judge's grade of one turn of one answer."""

    question_id: int | str
    category: str
    turn: int
    rating: float | None
    status: str
    problem: str = ""
    cached: bool = False
    requests: int = 0
    reply: str = ""


@dataclass
class MTBenchResult:
    """Scores of one set of answers.

    Attributes:
        score: mean of every valid grade of both turns, the MT-Bench score as
            FastChat's show_result.py computes it. It equals the mean of the
            two turn means whenever both turns have the same number of valid grades.
        score_se: standard error of `score`, sample standard deviation of the
            grades over the square root of their count; 0 for a single grade.
        turn_scores: mean valid grade per turn, keyed "1" and "2".
        graded: valid grades.
        unparseable: judgements without a usable rating after the reminder,
            left out of every mean.
        requests: chat requests sent to the judge; 0 when every verdict was cached.
        cached: verdicts taken from the cache.
        grades: every grade, in question and turn order.
    """

    score: float | None
    score_se: float | None
    turn_scores: dict[str, float]
    graded: int
    unparseable: int
    requests: int
    cached: int
    judge_model: str
    prompt_versions: list[str]
    grades: list[TurnGrade] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Return the result without the per-grade records, for an archive event."""
        values = asdict(self)
        values.pop("grades")
        values["unparseable_grades"] = [
            {"question_id": g.question_id, "turn": g.turn, "problem": g.problem}
            for g in self.grades
            if g.status != JudgementStatus.PARSED.value
        ]
        return values


def grade_answers(
    questions: Sequence[Question], answers: Sequence[Answer], judge: Judge, prompts: JudgePrompts = BUILTIN_PROMPTS
) -> MTBenchResult:
    """Grade every turn of every answer and return the MT-Bench score with its standard error."""
    by_id = {answer.question_id: answer for answer in answers}
    missing = [question.question_id for question in questions if question.question_id not in by_id]
    if missing:
        raise ValueError(f"no answers for question(s) {missing}; generate answers for every question first")

    requests, keys = [], []
    for question in questions:
        answer = by_id[question.question_id]
        if len(answer.turns) != len(question.turns):
            raise ValueError(
                f"question {question.question_id!r} has {len(question.turns)} turns but the answer has "
                f"{len(answer.turns)}"
            )
        for turn in range(1, len(question.turns) + 1):
            requests.append(_grading_request(question, answer, turn, prompts))
            keys.append((question, turn))
    judgements = judge.judge_all(requests)

    grades = [_turn_grade(question, turn, judgement) for (question, turn), judgement in zip(keys, judgements)]
    valid = [grade.rating for grade in grades if grade.rating is not None]
    turn_scores = {}
    for turn in (1, 2):
        ratings = [grade.rating for grade in grades if grade.turn == turn and grade.rating is not None]
        if ratings:
            turn_scores[str(turn)] = sum(ratings) / len(ratings)
    return MTBenchResult(
        score=sum(valid) / len(valid) if valid else None,
        score_se=standard_error(valid),
        turn_scores=turn_scores,
        graded=len(valid),
        unparseable=len(grades) - len(valid),
        requests=sum(judgement.requests for judgement in judgements),
        cached=sum(judgement.cached for judgement in judgements),
        judge_model=judge.model,
        prompt_versions=sorted({template.version for template, _ in requests}),
        grades=grades,
    )


def _grading_request(question: Question, answer: Answer, turn: int, prompts: JudgePrompts):
    # a reference template needs the reference answers of every turn shown, as FastChat's math templates do
    referenced = (
        question.category in REFERENCE_CATEGORIES
        and len(question.reference) >= turn
        and all(reference.strip() for reference in question.reference[:turn])
    )
    if turn == 1:
        template = prompts.single_reference if referenced else prompts.single
        fields = {"question": question.turns[0], "answer": answer.turns[0]}
        if referenced:
            fields["ref_answer_1"] = question.reference[0]
        return template, fields
    template = prompts.multi_turn_reference if referenced else prompts.multi_turn
    fields = {
        "question_1": question.turns[0],
        "answer_1": answer.turns[0],
        "question_2": question.turns[1],
        "answer_2": answer.turns[1],
    }
    if referenced:
        fields["ref_answer_1"], fields["ref_answer_2"] = question.reference[0], question.reference[1]
    return template, fields


def _turn_grade(question: Question, turn: int, judgement: Judgement) -> TurnGrade:
    return TurnGrade(
        question_id=question.question_id,
        category=question.category,
        turn=turn,
        rating=judgement.value if judgement.status is JudgementStatus.PARSED else None,
        status=judgement.status.value,
        problem=judgement.problem,
        cached=judgement.cached,
        requests=judgement.requests,
        reply=judgement.reply,
    )


def standard_error(values: Sequence[float]) -> float | None:
    """Return the standard error of the mean, with the sample standard deviation (n - 1); None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return 0.0
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))
