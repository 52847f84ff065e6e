"""The time estimate of one candidate's evaluation in the study's setup, from FLOPs, bandwidth and latency.

Every number here is an assumption or derived from one; nothing was
measured on the hardware the estimate describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evaluators.preference.study import StudySettings


@dataclass(frozen=True)
class EstimateAssumptions:
    """The numbers behind the time estimate of a plan. All are assumptions, none was measured here.

    Attributes:
        parameters: parameters of the policy. About 8.5e9 for Gemma 7B: 28
            layers of width 3072 with a 24,576-wide MLP plus a 256k-token
            embedding, counted from its Hugging Face config.
        mean_sequence_tokens: mean tokens of prompt plus completion per
            sequence, capped by max_length. Not measured on dpo-mix-7k.
        gpu_peak_tflops: dense bfloat16 peak of one GPU in TFLOP/s. 312 is
            NVIDIA's figure for the A100; pass 989 for an H100 SXM.
        utilization: fraction of that peak that training reaches (model FLOPs utilization).
        memory_bandwidth_tbs: GPU memory bandwidth in TB/s, which bounds
            token-by-token decoding (2.0 for an A100 80GB).
        questions: MT-Bench questions answered and graded, each with 2 turns (MT-Bench has 80).
        judge_latency_s: seconds per judge request.
        judge_workers: judge requests in flight at once.
        load_s: seconds to load, shard and save the model around one training.
    """

    parameters: float = 8.5e9
    mean_sequence_tokens: int = 500
    gpu_peak_tflops: float = 312.0
    utilization: float = 0.35
    memory_bandwidth_tbs: float = 2.0
    questions: int = 80
    judge_latency_s: float = 10.0
    judge_workers: int = 4
    load_s: float = 180.0


@dataclass(frozen=True)
class TimeEstimate:
    """Estimated seconds per candidate, by phase. These are estimates from `assumptions`, not measurements."""

    train_s: float
    answer_s: float
    judge_s: float
    load_s: float
    assumptions: EstimateAssumptions

    @property
    def total_s(self) -> float:
        return self.train_s + self.answer_s + self.judge_s + self.load_s


def estimate_time(settings: StudySettings, gpus: int, total_steps: int, assumptions: EstimateAssumptions) -> TimeEstimate:
    """Estimate the seconds of each phase of one candidate from FLOPs, memory bandwidth and judge latency."""
    tokens = min(assumptions.mean_sequence_tokens, settings.max_length)
    sequences = total_steps * settings.per_device_batch_size * settings.gradient_accumulation_steps * gpus * 2

    # per token: forward and backward of the policy (6N), the forward that
    # gradient checkpointing repeats (2N) and the reference forward (2N)
    flops_per_token = (6 + (2 if settings.gradient_checkpointing else 0) + 2) * assumptions.parameters
    throughput = gpus * assumptions.gpu_peak_tflops * 1e12 * assumptions.utilization
    train_s = sequences * tokens * flops_per_token / throughput

    # decoding reads every bf16 weight once per generated token of a batch, on one GPU
    step_s = 2 * assumptions.parameters / (assumptions.memory_bandwidth_tbs * 1e12)
    batches = math.ceil(assumptions.questions / settings.generation_batch_size)
    answer_s = 2 * batches * settings.max_new_tokens * step_s

    judge_s = 2 * assumptions.questions * assumptions.judge_latency_s / assumptions.judge_workers
    return TimeEstimate(train_s, answer_s, judge_s, assumptions.load_s, assumptions)
