"""`evolve heldout`: train a run's candidate, or a library loss, on another task or preset and score it there.

Evaluations (--eval):
- sentiment: the preference task, preset cpu unless --preset sets another.
  The fitness is its sentiment reward with the KL penalty.
- mtbench: train by a recipe, answer two-turn questions and let a judge at
  --judge-url grade each turn from 1 to 10. The fitness is the mean grade.
  The default preset, zephyr-7b-gemma, is the DiscoPOP study's setup. The
  preference presets cpu and tiny train the sentiment recipe instead.
- winrate: the same training. The judge then compares the policy's
  first-turn answers with the reference model's. The fitness is the win
  rate, reported with its length-controlled variant.

Training runs through the same Pipeline and sandbox backend as a run, on a
copy of the candidate in a scratch archive under RUN_DIR/heldout/, so the
run's candidates table is never changed. The judge runs in this process,
because the sandbox has no network, and caches its verdicts in
CACHE_DIR/judgements.sqlite. The result is appended to the run's events
table as a "heldout" event next to the original fitness, and printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from engine.cli import parse_setting
from engine.console import fmt
from engine.report import RunDirError, find_candidate, open_run_archive

console = Console()

HELDOUT_EVENT = "heldout"
EVALUATIONS = ("sentiment", "mtbench", "winrate")
_METRICS_KEPT = ("reward", "kl", "accuracy", "reward_gain", "train_s", "eval_s")

# Sandbox limits of a job in the study's setup. The process backend limits
# virtual memory (RLIMIT_AS), which CUDA reserves in large ranges, and the
# size of written files, which a saved 7B policy exceeds by far.
# NOTE: sized for a 7B model; no job of this size has run here (no GPU).
STUDY_TRAIN_TIMEOUT_S = 4 * 3600.0
STUDY_MEMORY_MB = 1024 * 1024
STUDY_OUTPUT_MB = 64 * 1024


class HeldoutError(ValueError):
    """Raised for invalid arguments or an unusable run directory; the message names the fix."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve heldout",
        description="Train one candidate of a run (or a library loss with --loss) on another task or preset and "
        "score it there; record the result next to the original fitness as a 'heldout' event of the run. "
        "Exit status: 0 evaluated, 1 rejected or failed, 2 usage error.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (contains archive.sqlite)")
    parser.add_argument("candidate_id", nargs="?", metavar="ID", help="candidate id, such as g003-a02 or seed-dpo")
    parser.add_argument("--loss", metavar="NAME|FILE", help="a library loss or a .py file instead of a candidate")

    parser.add_argument("--eval", dest="evaluation", required=True, choices=EVALUATIONS,
                        help="sentiment: the preference task; mtbench: judge grades 1-10; winrate: judge compares "
                        "with the reference model")
    parser.add_argument("--preset", help="sentiment: cpu (default) or tiny; mtbench and winrate: zephyr-7b-gemma "
                        "(default, the study's setup), cpu or tiny")
    parser.add_argument("--set", dest="settings", action="append", type=parse_setting, default=[],
                        metavar="KEY=VALUE", help="override one setting of the preset (repeatable)")
    parser.add_argument("--seed", type=int, help="training seed (default: the run's seed)")
    parser.add_argument("--cache-dir", type=Path, help="cache for models, data and judgements (default: the run's)")
    parser.add_argument("--sandbox", choices=("auto", "process", "docker"),
                        help="where the loss code runs (default: the backend the run used)")
    parser.add_argument("--train-timeout", type=float, metavar="SECONDS",
                        help="limit of the training job (default: the run's; 14400 for the study's setup)")

    judge = parser.add_argument_group("judge (mtbench and winrate)")
    judge.add_argument("--judge-url", default="", help="OpenAI-compatible endpoint of the judge "
                       "(default: OpenAI's, with the key in --judge-api-key-env)")
    judge.add_argument("--judge-model", default="gpt-4", help="judge model name (default: gpt-4, as in the study)")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                       help="environment variable that contains the judge's API key (default: OPENAI_API_KEY)")
    judge.add_argument("--judge-workers", type=int, default=4, help="judge requests in flight at once (default: 4)")
    judge.add_argument("--judge-retries", type=int, default=6,
                       help="retries of one judge request after 429, 5xx, timeouts and connection errors (default: 6)")
    judge.add_argument("--judge-timeout", type=float, default=120.0, help="seconds to wait for one judge response "
                       "(default: 120)")
    judge.add_argument("--questions", type=Path, help="questions in MT-Bench's question.jsonl format "
                       "(default: the project's own set in evaluators/preference/data/mt_questions.jsonl)")
    judge.add_argument("--reference-answers", type=Path, help="reference answers for math, reasoning and coding "
                       "questions, in the format of FastChat's reference_answer/gpt-4.jsonl (default: each "
                       "question's reference field)")
    judge.add_argument("--judge-prompts", type=Path, help="judge templates in the format of FastChat's "
                       "judge_prompts.jsonl (default: the project's own wording)")
    judge.add_argument("--max-new-tokens", type=int, help="tokens per answer (default: 1024 for the study's "
                       "setup, 128 for cpu and tiny)")

    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if (args.candidate_id is None) == (args.loss is None):
        console.print("[red]error:[/] pass a candidate ID or --loss NAME, not both and not neither", soft_wrap=True)
        return 2

    from engine.config import ConfigError
    from engine.runner import RunError
    from evaluators.preference.judge import JudgeUnavailable
    from evaluators.registry import UnknownTaskError

    spec = None
    try:
        run = _read_run(args)
        spec = build_evaluation(args, run)
        if not args.json:
            console.print(f"held-out evaluation {spec.evaluation} of {escape(run.original.id)} "
                          f"({escape(run.original.name)}), preset {spec.preset}, seed {spec.seed} ...")
        copy = train_copy(args, run, spec)
        detail = heldout_detail(run, spec, copy)
        if copy.status is Status.EVALUATED and spec.judge is not None:
            detail.update(judge_answers(spec, copy))
    except (HeldoutError, RunDirError, ConfigError, UnknownTaskError, ValueError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2
    except RunError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 1
    except JudgeUnavailable as error:
        detail["heldout_status"] = Status.FAILED.value
        detail["heldout_reason"] = str(error)
    finally:
        if spec is not None and spec.judge is not None and spec.judge.cache is not None:
            spec.judge.cache.close()

    writer = Archive.open_run(args.run_dir, read_only=False)
    try:
        writer.log_event(HELDOUT_EVENT, detail)
    finally:
        writer.close()
    if args.json:
        print(json.dumps(detail, indent=2, default=str))
    else:
        print_comparison(detail)
    return 0 if detail["heldout_status"] == Status.EVALUATED.value else 1


@dataclasses.dataclass
class RunInfo:
    """The candidate to evaluate and the stored configuration of its run."""

    original: Candidate
    source: str
    config: Any
    run_id: str
    backend: str


def _read_run(args: argparse.Namespace) -> RunInfo:
    from engine.config import config_from_dict

    archive = open_run_archive(args.run_dir)
    try:
        stored_config = archive.get_meta("config")
        run_id = str(archive.get_meta("run_id", args.run_dir.name))
        backend = archive.get_meta("backend", "")
        original = find_candidate(archive, args.candidate_id) if args.candidate_id else None
    except KeyError as error:
        raise HeldoutError(error.args[0]) from None
    finally:
        archive.close()
    if stored_config is None:
        raise HeldoutError("the archive contains no run configuration; was the run started?")
    config = config_from_dict(stored_config, source=f"{args.run_dir}/archive.sqlite")
    if original is None:
        from engine.commands.train import resolve_loss_program

        program = resolve_loss_program(args.loss)
        original = Candidate(id=f"loss-{program.name}", generation=0, attempt=0, origin=Origin.PROPOSER,
                             name=program.name, code=program.code, thought=program.label)
        return RunInfo(original, "library", config, run_id, backend)
    if not original.code.strip():
        raise HeldoutError(f"candidate {original.id} has no code (its reply could not be parsed); nothing to evaluate")
    return RunInfo(original, "run", config, run_id, backend)


@dataclasses.dataclass
class EvaluationSpec:
    """The task, settings and judge of one held-out evaluation."""

    evaluation: str
    preset: str
    task: Any
    task_ref: str
    settings: Any
    seed: int
    cache_dir: Path
    recipe: str = ""
    judge: Any = None
    questions: list = dataclasses.field(default_factory=list)
    prompts: Any = None


def build_evaluation(args: argparse.Namespace, run: RunInfo) -> EvaluationSpec:
    """Resolve the preset, the settings and the judge of the requested evaluation; fail before any training."""
    from engine.runner import resolve_settings
    from evaluators.registry import get_task

    seed = run.config.seed if args.seed is None else args.seed
    cache_dir = (args.cache_dir or run.config.resolved_cache_dir()).expanduser().resolve()
    overrides = dict(args.settings)
    preference = get_task("preference")

    if args.evaluation == "sentiment":
        preset = args.preset or "cpu"
        if preset not in preference.presets():
            raise HeldoutError(f"--eval sentiment trains the preference task; --preset must be one of "
                               f"{sorted(preference.presets())}, not {preset!r}")
        settings = resolve_settings(preference, preset, overrides)
        return EvaluationSpec(args.evaluation, preset, preference, "preference", settings, seed, cache_dir)

    from evaluators.preference.answers import ANSWER_TASK_REF, AnswerSettings, Recipe
    from evaluators.preference.judge import JudgeConfig, open_judge
    from evaluators.preference.judge_prompts import BUILTIN_PROMPTS, load_judge_prompts
    from evaluators.preference.mtbench import BUNDLED_QUESTIONS, load_questions, load_reference_answers
    from evaluators.preference.study import STUDY_PRESETS, study_settings

    preset = args.preset or "zephyr-7b-gemma"
    if preset in STUDY_PRESETS:
        recipe, training = Recipe.STUDY, study_settings(preset, overrides)
        batch_size, max_new_tokens = training.generation_batch_size, training.max_new_tokens
    elif preset in preference.presets():
        recipe, training = Recipe.SENTIMENT, resolve_settings(preference, preset, overrides)
        batch_size, max_new_tokens = training.generation_batch_size, 128
    else:
        raise HeldoutError(f"unknown preset {preset!r} for --eval {args.evaluation}; presets: "
                           f"{sorted(STUDY_PRESETS) + sorted(preference.presets())}")
    questions = load_questions(args.questions or BUNDLED_QUESTIONS)
    if args.reference_answers:
        questions = load_reference_answers(args.reference_answers, questions)
    prompts = load_judge_prompts(args.judge_prompts) if args.judge_prompts else BUILTIN_PROMPTS
    judge_config = JudgeConfig(model=args.judge_model, base_url=args.judge_url, api_key_env=args.judge_api_key_env,
                               workers=args.judge_workers, max_retries=args.judge_retries,
                               timeout_s=args.judge_timeout)
    judge = open_judge(judge_config, cache_dir)  # a missing API key fails here, before hours of training
    settings = AnswerSettings(
        recipe=recipe.value,
        training=dataclasses.asdict(training),
        questions=tuple(question.to_dict() for question in questions),
        max_new_tokens=args.max_new_tokens or max_new_tokens,
        generation_batch_size=batch_size,
        reference_answers=args.evaluation == "winrate",
        seed=seed,
    )
    task = get_task(ANSWER_TASK_REF)
    return EvaluationSpec(args.evaluation, preset, task, ANSWER_TASK_REF, settings, seed, cache_dir, recipe.value,
                          judge, questions, prompts)


def train_copy(args: argparse.Namespace, run: RunInfo, spec: EvaluationSpec) -> Candidate:
    """Judge a fresh copy of the candidate under the evaluation's task in a scratch archive; return the copy."""
    from engine.pipeline import Pipeline, PipelineLimits
    from engine.runner import choose_backend, pipeline_limits, prepare_task
    from sandbox.backend import Limits

    # the backend the run really used, unless --sandbox sets another
    sandbox = run.config.sandbox
    backend_kind = args.sandbox or run.backend
    if backend_kind:
        sandbox = dataclasses.replace(sandbox, backend=backend_kind)
    if args.train_timeout is not None:
        sandbox = dataclasses.replace(sandbox, train_timeout_s=args.train_timeout)
    backend, _ = choose_backend(sandbox, f"{run.run_id}-heldout")
    limits = pipeline_limits(sandbox)
    if spec.recipe == "study":
        timeout = args.train_timeout or STUDY_TRAIN_TIMEOUT_S
        limits = PipelineLimits(limits.unit_test, Limits(timeout_s=timeout, memory_mb=STUDY_MEMORY_MB,
                                                         cpus=sandbox.cpus, output_mb=STUDY_OUTPUT_MB, gpu=sandbox.gpu))

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{run.original.id}-{spec.evaluation}-{spec.preset}")
    scratch_dir = args.run_dir / "heldout" / f"{slug}-seed{spec.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    scratch_dir.mkdir(parents=True, exist_ok=True)
    prepare_task(spec.task, spec.settings, spec.cache_dir, scratch_dir / "jobs" / "prepare", task_ref=spec.task_ref)

    # A fresh copy starts at PENDING and is marked as a proposal, because the
    # pipeline takes a seed's fitness from the baseline cache instead of training it.
    original = run.original
    copy = Candidate(id=original.id, generation=original.generation, attempt=original.attempt,
                     origin=Origin.PROPOSER, name=original.name, code=original.code, thought=original.thought,
                     model=original.model)
    scratch = Archive(scratch_dir / "archive.sqlite")
    try:
        scratch.set_meta("heldout_of", {"run_dir": str(args.run_dir), "candidate_id": original.id,
                                        "evaluation": spec.evaluation, "preset": spec.preset, "seed": spec.seed})
        scratch.insert(copy)
        pipeline = Pipeline(task=spec.task, settings=spec.settings, backend=backend, archive=scratch,
                            run_dir=scratch_dir, cache_dir=spec.cache_dir, limits=limits, seed=spec.seed,
                            task_ref=spec.task_ref)
        pipeline.judge(copy)
    finally:
        scratch.close()
    copy.metrics["heldout_dir"] = str(scratch_dir)
    return copy


def heldout_detail(run: RunInfo, spec: EvaluationSpec, copy: Candidate) -> dict[str, Any]:
    """Return the event record: the original outcome and the held-out training's outcome."""
    original = run.original
    evaluated = copy.status is Status.EVALUATED
    detail = {
        "candidate_id": original.id,
        "name": original.name,
        "source": run.source,
        "evaluation": spec.evaluation,
        "task": spec.task_ref,
        "preset": spec.preset,
        "seed": spec.seed,
        "original_task": run.config.task,
        "original_status": original.status.value if run.source == "run" else None,
        "original_fitness": original.fitness if run.source == "run" else None,
        "original_metrics": {k: original.metrics[k] for k in _METRICS_KEPT if k in original.metrics},
        "heldout_status": copy.status.value,
        "heldout_stage": copy.stage.value if copy.stage else None,
        "heldout_category": copy.category,
        "heldout_reason": copy.reason,
        "heldout_fitness": copy.fitness if evaluated else None,
        "heldout_fitness_kind": "sentiment reward with KL penalty",
        "heldout_metrics": {k: copy.metrics[k] for k in _METRICS_KEPT if k in copy.metrics},
        "heldout_timings": dict(copy.timings),
        "heldout_dir": copy.metrics.get("heldout_dir", ""),
    }
    if spec.judge is not None:
        detail["heldout_fitness"] = None
        detail["heldout_fitness_kind"] = {"mtbench": "MT-Bench score (mean judge rating, 1-10)",
                                          "winrate": "win rate over the reference model"}[spec.evaluation]
        detail["training_fitness"] = copy.metrics.get("training_fitness") if evaluated else None
        detail["training_fitness_kind"] = copy.metrics.get("training_fitness_kind", "")
        detail["judge"] = {"model": spec.judge.model, "url": spec.judge.client.url}
    return detail


def judge_answers(spec: EvaluationSpec, copy: Candidate) -> dict[str, Any]:
    """Grade the answers the training job returned; return the event fields of the judged fitness."""
    from evaluators.preference.mtbench import Answer, grade_answers
    from evaluators.preference.winrate import compare_answers

    answers = [Answer.from_dict(values) for values in copy.metrics["answers"]]
    if spec.evaluation == "mtbench":
        result = grade_answers(spec.questions, answers, spec.judge, spec.prompts)
        fitness, summary = result.score, result.summary()
    else:
        reference = [Answer.from_dict(values) for values in copy.metrics["reference_answers"]]
        result = compare_answers(spec.questions, answers, reference, spec.judge, spec.prompts, seed=spec.seed)
        fitness, summary = result.win_rate, result.summary()
    fields: dict[str, Any] = {"heldout_fitness": fitness, "judged": summary}
    if fitness is None:
        fields["heldout_status"] = Status.FAILED.value
        fields["heldout_reason"] = "the judge gave no usable verdict for any answer; see judged.unparseable"
    return fields


def print_comparison(detail: dict[str, Any]) -> None:
    console.print(f"[bold]{escape(detail['candidate_id'])}[/] {escape(detail['name'])}: held-out evaluation "
                  f"{detail['evaluation']} (preset {detail['preset']}, seed {detail['seed']})")
    if detail["source"] == "run":
        console.print(f"  original: {detail['original_status']}, fitness {fmt(detail['original_fitness'])} "
                      f"(task {escape(detail['original_task'])})")
    else:
        console.print("  original: none, a library loss")
    if detail["heldout_status"] != Status.EVALUATED.value:
        console.print(f"  held-out: {detail['heldout_status']} at {detail['heldout_stage']}: "
                      f"{escape(detail['heldout_reason'])}", soft_wrap=True)
    else:
        console.print(f"  held-out: evaluated, {detail['heldout_fitness_kind']} {fmt(detail['heldout_fitness'])}")
    judged = detail.get("judged")
    if judged and "score" in judged:
        turns = ", ".join(f"turn {turn} {fmt(score)}" for turn, score in judged["turn_scores"].items())
        console.print(f"    standard error {fmt(judged['score_se'])}; {turns}; {judged['graded']} grades, "
                      f"{judged['unparseable']} unparseable")
    elif judged:
        console.print(f"    standard error {fmt(judged['win_rate_se'])}; length-controlled "
                      f"{fmt(judged['lc_win_rate'])} (standard error {fmt(judged['lc_win_rate_se'])}); "
                      f"{judged['wins']} wins, {judged['ties']} ties, {judged['losses']} losses, "
                      f"{judged['unparseable']} unparseable")
    if judged:
        console.print(f"    judge {escape(judged['judge_model'])}: {judged['requests']} requests, "
                      f"{judged['cached']} verdicts from the cache")
    if detail.get("training_fitness") is not None:
        console.print(f"    training fitness {fmt(detail['training_fitness'])} "
                      f"({escape(detail['training_fitness_kind'])})")
    console.print(f"  jobs and logs: {escape(detail['heldout_dir'])}", soft_wrap=True)
