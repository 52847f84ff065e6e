"""Pairwise win rate against the reference model, in the manner of AlpacaEval.

The judge is shown a question with the policy's and the reference model's
answers to its first turn and names the better one. Half of the
comparisons, chosen at random with a fixed seed, show the policy's answer
first, so a judge that favours a position moves wins and losses alike, and
each comparison records the order it used.

The win rate counts a tie as half a win. Its length-controlled variant
follows Dubois et al. 2024 ("Length-Controlled AlpacaEval: A Simple Way to
Debias Automatic Evaluators"): a logistic regression predicts each outcome
from an intercept and tanh(length difference / its standard deviation), and
the length-controlled win rate is the prediction at zero length difference,
sigmoid(intercept). NOTE: AlpacaEval's model also has an instruction
difficulty term fitted across many models; with one policy and one
reference that term cannot be estimated, so it is left out.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from evaluators.preference.judge import Judge, JudgementStatus
from evaluators.preference.judge_prompts import BUILTIN_PROMPTS, JudgePrompts, Winner
from evaluators.preference.mtbench import Answer, Question, standard_error

# L2 penalty of the regression. It is large enough to keep the fit finite
# when every comparison is won (complete separation), and small enough to
# move the two-group fit of the tests by about 1e-5.
_RIDGE = 1e-4


@dataclass(frozen=True)
class Comparison:
    """One judged pair.

    Attributes:
        policy_position: "A" when the policy's answer was shown first, else "B".
        outcome: 1.0 policy wins, 0.0 reference wins, 0.5 tie; None when unparseable.
        policy_chars, reference_chars: answer lengths in characters.
    """

    question_id: int | str
    policy_position: str
    outcome: float | None
    status: str
    policy_chars: int
    reference_chars: int
    problem: str = ""
    cached: bool = False
    requests: int = 0
    reply: str = ""


@dataclass
class WinRateResult:
    """Win rate of the policy over the reference model, raw and length-controlled.

    Attributes:
        win_rate: mean outcome over the parsed comparisons (tie = 0.5).
        win_rate_se: its standard error, sample standard deviation over sqrt(n).
        lc_win_rate: sigmoid(intercept) of the length regression.
        lc_win_rate_se: its standard error by the delta method,
            p (1 - p) times the intercept's standard error from the inverse Hessian.
        length_coefficient: the regression's weight on tanh(length difference / std).
        policy_first: comparisons that showed the policy's answer first.
    """

    win_rate: float | None
    win_rate_se: float | None
    lc_win_rate: float | None
    lc_win_rate_se: float | None
    length_coefficient: float | None
    wins: int
    losses: int
    ties: int
    compared: int
    unparseable: int
    policy_first: int
    requests: int
    cached: int
    judge_model: str
    prompt_version: str
    comparisons: list[Comparison] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Return the result without the per-pair records, for an archive event."""
        values = asdict(self)
        values.pop("comparisons")
        values["positions"] = {str(c.question_id): c.policy_position for c in self.comparisons}
        return values


def policy_positions(count: int, seed: int) -> list[str]:
    """Return "A" or "B" per comparison: as balanced as `count` allows, in a seeded random order."""
    positions = ["A" if index % 2 == 0 else "B" for index in range(count)]
    random.Random(seed).shuffle(positions)
    return positions


def compare_answers(
    questions: Sequence[Question],
    policy_answers: Sequence[Answer],
    reference_answers: Sequence[Answer],
    judge: Judge,
    prompts: JudgePrompts = BUILTIN_PROMPTS,
    seed: int = 0,
) -> WinRateResult:
    """Judge the policy's first-turn answers against the reference model's and return the win rates."""
    policy = {answer.question_id: answer for answer in policy_answers}
    reference = {answer.question_id: answer for answer in reference_answers}
    missing = [q.question_id for q in questions if q.question_id not in policy or q.question_id not in reference]
    if missing:
        raise ValueError(f"question(s) {missing} lack a policy or a reference answer; generate both first")

    template = prompts.pairwise
    positions = policy_positions(len(questions), seed)
    requests = []
    for question, position in zip(questions, positions):
        mine, theirs = policy[question.question_id].turns[0], reference[question.question_id].turns[0]
        answer_a, answer_b = (mine, theirs) if position == "A" else (theirs, mine)
        requests.append((template, {"question": question.turns[0], "answer_a": answer_a, "answer_b": answer_b}))
    judgements = judge.judge_all(requests)

    comparisons = []
    for question, position, judgement in zip(questions, positions, judgements):
        outcome = None
        if judgement.status is JudgementStatus.PARSED:
            outcome = 0.5 if judgement.value is Winner.TIE else float(judgement.value.value == position)
        comparisons.append(
            Comparison(
                question_id=question.question_id,
                policy_position=position,
                outcome=outcome,
                status=judgement.status.value,
                policy_chars=len(policy[question.question_id].turns[0]),
                reference_chars=len(reference[question.question_id].turns[0]),
                problem=judgement.problem,
                cached=judgement.cached,
                requests=judgement.requests,
                reply=judgement.reply,
            )
        )

    parsed = [c for c in comparisons if c.outcome is not None]
    outcomes = [c.outcome for c in parsed]
    length_fit = length_controlled_win_rate(outcomes, [c.policy_chars - c.reference_chars for c in parsed])
    return WinRateResult(
        win_rate=sum(outcomes) / len(outcomes) if outcomes else None,
        win_rate_se=standard_error(outcomes),
        lc_win_rate=length_fit[0],
        lc_win_rate_se=length_fit[1],
        length_coefficient=length_fit[2],
        wins=sum(outcome == 1.0 for outcome in outcomes),
        losses=sum(outcome == 0.0 for outcome in outcomes),
        ties=sum(outcome == 0.5 for outcome in outcomes),
        compared=len(parsed),
        unparseable=len(comparisons) - len(parsed),
        policy_first=positions.count("A"),
        requests=sum(j.requests for j in judgements),
        cached=sum(j.cached for j in judgements),
        judge_model=judge.model,
        prompt_version=template.version,
        comparisons=comparisons,
    )


def length_controlled_win_rate(
    outcomes: Sequence[float], length_differences: Sequence[float]
) -> tuple[float | None, float | None, float | None]:
    """Fit logit P(policy wins) = a + b * tanh(d / std(d)); return (sigmoid(a), its standard error, b).

    Outcomes are 1, 0 or 0.5 and enter the cross-entropy as soft labels. The
    fit is Newton's method on the L2-penalised negative log-likelihood. When
    every length difference is equal, std(d) is 0, the length feature is set
    to 0 and the result is the raw win rate.
    """
    if not outcomes:
        return None, None, None
    targets = np.asarray(outcomes, dtype=np.float64)  # (N,)
    differences = np.asarray(length_differences, dtype=np.float64)  # (N,)
    spread = differences.std(ddof=1) if len(differences) > 1 else 0.0
    feature = np.tanh(differences / spread) if spread > 0 else np.zeros_like(differences)
    features = np.stack([np.ones_like(feature), feature], axis=1)  # (N, 2)

    weights = np.zeros(2)
    for _ in range(100):
        probabilities = 1.0 / (1.0 + np.exp(-(features @ weights)))
        gradient = features.T @ (probabilities - targets) + _RIDGE * weights
        curvature = probabilities * (1.0 - probabilities)
        hessian = features.T @ (features * curvature[:, None]) + _RIDGE * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights = weights - step
        if np.max(np.abs(step)) < 1e-10:
            break

    probabilities = 1.0 / (1.0 + np.exp(-(features @ weights)))
    curvature = probabilities * (1.0 - probabilities)
    hessian = features.T @ (features * curvature[:, None]) + _RIDGE * np.eye(2)
    intercept_variance = float(np.linalg.inv(hessian)[0, 0])
    win_rate = 1.0 / (1.0 + math.exp(-weights[0]))
    standard_error = win_rate * (1.0 - win_rate) * math.sqrt(max(intercept_variance, 0.0))
    return win_rate, standard_error, float(weights[1])
