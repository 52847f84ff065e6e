"""The evolution loop: seeds, then one judged proposal per generation.

This is the discovery loop of the DiscoPOP study (Lu et al. 2024, Algorithm 1):
ask the proposer for a program, validate it, send invalid ones back with the
error and resample, train and score valid ones and send the fitness back.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from engine.archive import Archive
from engine.budget import BudgetExceeded, usage_of
from engine.candidate import Candidate, Origin, Status
from engine.pipeline import Pipeline
from engine.prompts import INVALID_PREFIX, ContextOptions, build_context, feedback_message, system_prompt
from engine.proposer import HistoryEntry, ProposalRequest, Proposer, ProposerReply, ProposerStopped
from engine.reply import ReplyParseError, parse_reply
from evaluators.task import SeedProgram, Task
from sandbox.protocol import Stage

logger = logging.getLogger(__name__)


class SeedsFailed(RuntimeError):
    """Error raised when none of the seed programs, which are known-good code, could be evaluated.

    It is raised before any proposal is made, because the sandbox or the task
    setup is broken and every proposal would fail the same way. Resuming the
    run judges the seeds again.
    """


class Reporter(Protocol):
    """Receiver of the events that a person watching the run sees."""

    def generation_started(self, generation: int, total: int) -> None: ...

    def candidate_started(self, candidate: Candidate) -> None: ...

    def candidate_finished(self, candidate: Candidate) -> None: ...

    def generation_finished(self, generation: int, candidates: list[Candidate]) -> None: ...


@dataclass(frozen=True)
class LoopOptions:
    generations: int
    max_attempts: int
    seed: int
    context: ContextOptions = ContextOptions()
    time_budget_s: float = 0.0  # 0 means no limit
    population: int = 1  # candidates evaluated per generation
    workers: int = 1  # candidates judged at the same time


def interface_text(task: Task) -> str:
    """Describe the function a candidate must define, in both accepted forms."""
    params = ", ".join(task.interface.params)
    hyper = task.interface.hyperparameters
    # the study's method form takes self only to read hyperparameters
    signature = f"self, {params}" if hyper else params
    lines = [
        "Write one Python function with exactly these parameters:",
        f"    def <name>({signature}):",
    ]
    if hyper:
        reads = ", ".join(f"self.{name}" for name in hyper)
        lines.append(f"Read {reads} for the hyperparameter value(s); do not hard-code them.")
    if task.interface.returns:
        lines.append(f"It must return {task.interface.returns}.")
    lines.append(
        "You may import only torch, torch.nn.functional (as F) and math. Do not read files, "
        "use the network, start processes, or access attributes whose names start with an underscore."
    )
    return "\n".join(lines)


class Evolution:
    """Drives one run from its seeds to its last generation; resumable at any point."""

    def __init__(
        self,
        task: Task,
        settings: object,
        archive: Archive,
        pipeline: Pipeline,
        proposer: Proposer,
        reporter: Reporter,
        options: LoopOptions,
    ) -> None:
        self.task = task
        self.settings = settings
        self.archive = archive
        self.pipeline = pipeline
        self.proposer = proposer
        self.reporter = reporter
        self.options = options
        self._seeds_requeued = False
        self._system = system_prompt(task.prompt_text(settings), interface_text(task))

    # seeds

    def add_seeds(self, seeds: list[SeedProgram]) -> None:
        """Insert the seed programs once; a resumed run finds them already there."""
        if self.archive.seeds():
            return
        for index, seed in enumerate(seeds):
            candidate = Candidate(
                id=f"seed-{seed.name}",
                generation=0,
                attempt=index,
                origin=Origin.SEED,
                name=seed.name,
                code=seed.code,
                thought=seed.thought,
            )
            self.archive.insert(candidate)

    def judge_unfinished(self) -> None:
        """Finish every candidate left unfinished by an earlier, interrupted process.

        Seeds that an earlier process judged without evaluating any of them
        (the run then stopped with SeedsFailed) are judged again.
        """
        self._requeue_failed_seeds()
        unfinished = self.archive.unfinished()
        for candidate in unfinished:
            # new seeds come here too, as pending candidates, so the message does not say "resuming"
            logger.info("judging unfinished candidate %s (%s), status %s", candidate.id, candidate.name,
                        candidate.status.value)
        self.judge_batch(unfinished)

    def _requeue_failed_seeds(self) -> None:
        if self._seeds_requeued:
            return
        self._seeds_requeued = True  # once per process, so a second failure stops the run instead of looping
        seeds = self.archive.seeds()
        if not seeds or not all(seed.status.is_final for seed in seeds):
            return
        if any(seed.status is Status.EVALUATED for seed in seeds):
            return
        logger.info("judging the %d seeds again: none was evaluated by the earlier process", len(seeds))
        for seed in seeds:
            seed.status = Status.PENDING
            seed.stage = None
            seed.category = seed.reason = seed.log_tail = seed.duplicate_of = ""
            seed.fitness = None
            seed.metrics = {}
            seed.timings = {}
            self.archive.update(seed)

    def check_seeds(self) -> None:
        """Raise SeedsFailed when there are seeds and none of them was evaluated."""
        seeds = self.archive.seeds()
        if not seeds or any(seed.status is Status.EVALUATED for seed in seeds):
            return
        lines = []
        for seed in seeds:
            stage = seed.stage.value if seed.stage is not None else "?"
            lines.append(f"  {seed.name}: {seed.status.value} at {stage}: {seed.reason.splitlines()[0] if seed.reason else ''}")
        raise SeedsFailed(
            f"none of the {len(seeds)} seed programs could be evaluated. They are known-good code, so the sandbox "
            "or the task setup is broken and every proposal would fail the same way:\n" + "\n".join(lines) + "\n"
            "Run `evolve sandbox check` to test the sandbox and read the seeds' logs with `evolve show RUN_DIR`."
        )

    def judge_batch(self, candidates: list[Candidate]) -> None:
        """Judge candidates, up to `workers` at once, and store each with its feedback.

        Each evaluation has its own deadline inside the sandbox backend, so a
        hung candidate is killed at its deadline while the others go on.
        """
        if self.options.workers <= 1 or len(candidates) <= 1:
            for candidate in candidates:
                self._judge_one(candidate)
            return
        with ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="judge") as pool:
            for future in [pool.submit(self._judge_one, candidate) for candidate in candidates]:
                future.result()

    def _judge_one(self, candidate: Candidate) -> None:
        self.reporter.candidate_started(candidate)
        best_before = self.best_fitness()
        if not candidate.status.is_final:
            self.pipeline.judge(candidate)
        if candidate.origin is Origin.PROPOSER:
            candidate.feedback = feedback_message(candidate)
            self.archive.update(candidate)
            self.proposer.observe(candidate.model, improves(candidate, best_before))
        self.reporter.candidate_finished(candidate)

    # generations

    def run(self) -> None:
        start = time.monotonic()
        self.judge_unfinished()
        self.check_seeds()
        self.replay_outcomes()
        completed = self.archive.get_meta("completed_generations", 0)
        for generation in range(completed + 1, self.options.generations + 1):
            if self.options.time_budget_s and time.monotonic() - start > self.options.time_budget_s:
                logger.info("time budget of %.0f s reached before generation %d", self.options.time_budget_s, generation)
                self.archive.log_event("budget", {"kind": "time", "generation": generation})
                break
            self.reporter.generation_started(generation, self.options.generations)
            candidates = self.run_generation(generation)
            self.archive.set_meta("completed_generations", generation)
            self.reporter.generation_finished(generation, candidates)

    def run_generation(self, generation: int) -> list[Candidate]:
        """Propose and judge until `population` candidates are evaluated or the attempts are used up.

        Each round proposes one candidate per missing evaluation and judges the
        round together; invalid ones are resampled in the next round with their
        errors in the context. The attempts per generation are
        `max_attempts * population`.
        """
        produced = self.archive.candidates("generation=? AND origin=?", (generation, Origin.PROPOSER.value))
        population = self.options.population
        max_attempts = self.options.max_attempts * population
        attempts = len(produced)
        evaluated = sum(1 for c in produced if c.status is Status.EVALUATED)
        while evaluated < population and attempts < max_attempts:
            batch = []
            for _ in range(min(population - evaluated, max_attempts - attempts)):
                attempts += 1
                batch.append(self.propose(generation, attempts))
            self.judge_batch(batch)
            produced.extend(batch)
            evaluated += sum(1 for c in batch if c.status is Status.EVALUATED)
        return produced

    def history(self) -> list[HistoryEntry]:
        return [
            HistoryEntry(name=c.name, code=c.code, fitness=c.fitness, status=c.status.value)
            for c in self.archive.candidates()
            if c.status.is_final
        ]

    def best_fitness(self) -> float | None:
        """Return the highest fitness of any evaluated candidate, seeds included."""
        scores = [c.fitness for c in self.archive.candidates("status=?", (Status.EVALUATED.value,)) if c.fitness is not None]
        return max(scores, default=None)

    def replay_outcomes(self) -> None:
        """Tell the proposer the outcome of every judged proposal, so a resumed bandit starts where it stopped."""
        scores = [s.fitness for s in self.archive.seeds() if s.status is Status.EVALUATED and s.fitness is not None]
        best = max(scores, default=None)
        for candidate in self.archive.iter_proposals():
            if not candidate.status.is_final:
                continue
            improved = improves(candidate, best)
            self.proposer.observe(candidate.model, improved)
            if improved:
                best = candidate.fitness

    def propose(self, generation: int, attempt: int) -> Candidate:
        """Ask the proposer once and store the reply as a candidate (parsed or not).

        When the proposer stops the run (endpoint down, budget reached), the
        call is recorded with its error and what it spent, and the exception
        propagates, so no candidate is stored and the generation stays open.
        """
        seeds = self.archive.seeds()
        proposals = list(self.archive.iter_proposals())
        context = build_context(self._system, seeds, proposals, self.options.context)
        if context.dropped:
            logger.info("generation %d attempt %d: %d earlier proposal(s) left out to fit the %d-token context window",
                        generation, attempt, context.dropped, self.options.context.window_tokens)
        request = ProposalRequest(
            messages=context.messages,
            history=self.history(),
            generation=generation,
            attempt=attempt,
            seed=self.options.seed,
            task=self.task.name,
        )
        try:
            reply: ProposerReply = self.proposer.propose(request)
        except ProposerStopped as stopped:
            self._record_stopped_call(generation, attempt, stopped)
            raise
        candidate_id = self.archive.next_candidate_id(generation, attempt)
        context_ids = [c.id for c in seeds] + [c.id for c in context.shown]
        candidate = Candidate(
            id=candidate_id,
            generation=generation,
            attempt=attempt,
            origin=Origin.PROPOSER,
            name="",
            code="",
            reply=reply.text,
            model=reply.model,
            context_ids=context_ids,
        )
        candidate.timings["llm_s"] = round(reply.latency_s, 3)
        try:
            proposal = parse_reply(reply.text)
        except ReplyParseError as error:
            candidate.name = f"unparsed_{candidate_id.replace('-', '_')}"
            candidate.status = Status.REJECTED
            candidate.stage = Stage.PARSE
            candidate.category = "parse"
            candidate.reason = f"the reply could not be parsed: {error.reason}"
        else:
            candidate.name = proposal.name
            candidate.thought = proposal.thought
            candidate.code = proposal.code
        self.archive.insert(candidate)
        self.archive.record_llm_call(
            generation=generation,
            attempt=attempt,
            candidate_id=candidate_id,
            model=reply.model,
            **usage_of(reply),
        )
        return candidate

    def _record_stopped_call(self, generation: int, attempt: int, stopped: ProposerStopped) -> None:
        kind = "budget" if isinstance(stopped, BudgetExceeded) else "proposer_unavailable"
        logger.error("generation %d attempt %d: the run stops: %s", generation, attempt, stopped)
        self.archive.log_event(kind, {"generation": generation, "attempt": attempt, "message": str(stopped)})
        if stopped.usage is not None and stopped.usage.requests:
            self.archive.record_llm_call(
                generation=generation,
                attempt=attempt,
                candidate_id="",
                model=stopped.usage.model,
                error=str(stopped)[:1000],
                **usage_of(stopped.usage),
            )


def improves(candidate: Candidate, best_before: float | None) -> bool:
    """Return whether a judged candidate raised the best fitness."""
    if candidate.status is not Status.EVALUATED or candidate.fitness is None:
        return False
    return best_before is None or candidate.fitness > best_before


def summarize(archive: Archive) -> dict[str, object]:
    """Return counts by status and the best evaluated proposal (or seed)."""
    counts: dict[str, int] = {}
    best: Candidate | None = None
    best_seed: Candidate | None = None
    for candidate in archive.candidates():
        counts[candidate.status.value] = counts.get(candidate.status.value, 0) + 1
        if candidate.status is not Status.EVALUATED or candidate.fitness is None:
            continue
        if candidate.origin is Origin.SEED:
            if best_seed is None or candidate.fitness > best_seed.fitness:
                best_seed = candidate
        elif best is None or candidate.fitness > best.fitness:
            best = candidate
    return {"counts": counts, "best": best, "best_seed": best_seed}


__all__ = [
    "BudgetExceeded",
    "Evolution",
    "INVALID_PREFIX",
    "LoopOptions",
    "Reporter",
    "improves",
    "interface_text",
    "summarize",
]
