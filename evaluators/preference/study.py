"""The DiscoPOP study's discovery setup as a preset, and the plan of one candidate's evaluation.

Lu, Holt, Fanconi et al. 2024 ("Discovering Preference Optimization
Algorithms with and for Large Language Models") trained each candidate loss
on zephyr-7b-gemma-sft-v0.1 with argilla/dpo-mix-7k and scored it on
MT-Bench. The values of `StudySettings` come from the study's recipe
recipes/zephyr-7b-gemma/gpo/config_full.yaml in github.com/luchris429/DiscoPOP.
It sets beta 0.05, learning rate 5e-7, 2 epochs, batch 2 per device,
gradient accumulation 8, a cosine schedule with 10% warmup, AdamW, bf16,
gradient checkpointing, sequences of at most 1024 tokens and seed 42. The
study's scripts/launch_evo.py trains with DeepSpeed ZeRO-3 on 8 GPUs.

`python -m evaluators.preference.study --dry-run [--gpus N]` prints the
resolved plan and its time estimate. It loads no model or data and opens no
network connection.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from evaluators.preference.study_estimate import EstimateAssumptions, TimeEstimate, estimate_time

STUDY_MODEL = "HuggingFaceH4/zephyr-7b-gemma-sft-v0.1"
STUDY_DATASET = "argilla/dpo-mix-7k"

# Pairs per split, from the split metadata (num_examples) of the dataset card
# of argilla/dpo-mix-7k on the Hugging Face Hub: train 6,750, test 750.
KNOWN_SPLIT_SIZES = {STUDY_DATASET: {"train": 6750, "test": 750}}

# Effective batch of the study: 2 per device x 8 accumulation steps x 8 GPUs.
# launch_evo.py keeps it at 4 GPUs by doubling the accumulation steps to 16.
STUDY_EFFECTIVE_BATCH = 128


@dataclass(frozen=True)
class StudySettings:
    """Settings of one candidate's training and MT-Bench evaluation in the study's setup.

    Attributes:
        model: policy to fine-tune: a Hugging Face Hub id or a local directory
            written by `save_pretrained`. `prepare` copies it into the cache,
            because sandboxed evaluations have no network.
        reference_model: frozen reference model; "" uses `model`, as the study does.
        dataset: preference pairs: a Hub id, a directory written by
            `save_to_disk`, or a .jsonl, .json or .parquet file. Rows hold
            `chosen` and `rejected` conversations (lists of chat messages) or
            texts, with an optional `prompt`.
        train_split: split trained on.
        eval_split: split whose pairs give the held-out reward accuracy after
            training; "" skips it. A single file has only a "train" split.
        max_train_pairs: train on the first N pairs only; 0 uses all.
        max_eval_pairs: evaluate on the first N held-out pairs only; 0 uses all.
        beta: beta bound into the candidate loss (the study used 0.05).
        learning_rate: peak learning rate of AdamW.
        num_train_epochs: passes over the training pairs.
        max_steps: stop after this many optimizer steps; 0 lets the epochs decide.
        per_device_batch_size: pairs per GPU per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        lr_scheduler: learning-rate schedule, a transformers scheduler name.
        warmup_ratio: fraction of the steps with linear warmup.
        optimizer: transformers optimizer name.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clipping threshold.
        bf16: train in bfloat16. Without a CUDA GPU that supports it, training runs in float32.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        max_length: tokens kept per prompt plus completion. NOTE: the study
            also cut prompts to 512 tokens (max_prompt_length); TRL 1.16's
            DPOConfig has no such field and only truncates whole sequences.
        deepspeed: "zero3" shards parameters, gradients and optimizer state
            across the GPUs with DeepSpeed ZeRO-3 when the deepspeed package is
            installed; "none" uses plain data parallelism.
        gpus: processes (one per GPU) to train with; 0 uses every visible GPU.
        seed: seed of the data order and of answer sampling.
        max_new_tokens: tokens generated per MT-Bench answer (FastChat's default: 1024).
        generation_batch_size: conversations answered per generate call.
    """

    model: str = STUDY_MODEL
    reference_model: str = ""
    dataset: str = STUDY_DATASET
    train_split: str = "train"
    eval_split: str = "test"
    max_train_pairs: int = 0
    max_eval_pairs: int = 0
    beta: float = 0.05
    learning_rate: float = 5e-7
    num_train_epochs: float = 2.0
    max_steps: int = 0
    per_device_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    optimizer: str = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = True
    gradient_checkpointing: bool = True
    max_length: int = 1024
    deepspeed: str = "zero3"
    gpus: int = 0
    seed: int = 42
    max_new_tokens: int = 1024
    generation_batch_size: int = 16

    def __post_init__(self) -> None:
        errors = []
        for name in ("model", "dataset", "train_split", "lr_scheduler", "optimizer"):
            if not str(getattr(self, name)).strip():
                errors.append(f"{name} is empty")
        positive_ints = ("per_device_batch_size", "gradient_accumulation_steps", "max_length", "max_new_tokens",
                         "generation_batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name}={value!r} is invalid; expected an integer >= 1")
        for name in ("max_train_pairs", "max_eval_pairs", "max_steps", "gpus", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                errors.append(f"{name}={value!r} is invalid; expected an integer >= 0")
        for name in ("beta", "learning_rate", "num_train_epochs", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                errors.append(f"{name}={value!r} is invalid; expected a number > 0")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            errors.append(f"warmup_ratio={self.warmup_ratio!r} is invalid; expected a number from 0 to below 1")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay!r} is invalid; expected a number >= 0")
        if self.deepspeed not in ("zero3", "none"):
            errors.append(f"deepspeed={self.deepspeed!r} is invalid; expected 'zero3' or 'none'")
        if errors:
            raise ValueError("invalid study settings:\n  " + "\n  ".join(errors))

    @property
    def reference(self) -> str:
        """Return the reference model's source."""
        return self.reference_model or self.model


ZEPHYR_7B_GEMMA = StudySettings()
STUDY_PRESETS: dict[str, StudySettings] = {"zephyr-7b-gemma": ZEPHYR_7B_GEMMA}


def study_settings(preset: str = "zephyr-7b-gemma", overrides: dict[str, Any] | None = None) -> StudySettings:
    """Return a study preset with single values replaced, converting ints to floats where a field is a float.

    Raises:
        ValueError: naming an unknown preset or setting, or every invalid value.
    """
    if preset not in STUDY_PRESETS:
        raise ValueError(f"unknown study preset {preset!r}; presets: {sorted(STUDY_PRESETS)}")
    base = STUDY_PRESETS[preset]
    overrides = dict(overrides or {})
    known = {f.name: f for f in dataclasses.fields(StudySettings)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown study setting(s) {unknown}; settings: {sorted(known)}")
    for name, value in overrides.items():
        current = getattr(base, name)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            overrides[name] = float(value)
    return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class Plan:
    """The resolved setup of one candidate's evaluation: what is trained, how, and how long it should take.

    Attributes:
        train_pairs: training pairs, None when the dataset's size is unknown without loading it.
        pairs_source: where `train_pairs` comes from.
        effective_batch: pairs per optimizer step over all GPUs.
        steps_per_epoch: optimizer steps per epoch, as transformers' Trainer
            counts them: ceil(ceil(ceil(pairs / gpus) / batch) / accumulation).
        deepspeed: the parallelism that training will use, in words.
        model_state_gb_per_gpu: estimated GPU memory for parameters, gradients
            and AdamW state of the policy plus the bf16 reference, without activations.
    """

    preset: str
    settings: StudySettings
    gpus: int
    train_pairs: int | None
    pairs_source: str
    effective_batch: int
    steps_per_epoch: int | None
    total_steps: int | None
    warmup_steps: int | None
    deepspeed: str
    model_state_gb_per_gpu: float
    launch: str
    estimate: TimeEstimate | None
    notes: tuple[str, ...] = field(default_factory=tuple)


def study_plan(
    settings: StudySettings, gpus: int, assumptions: EstimateAssumptions = EstimateAssumptions(), preset: str = ""
) -> Plan:
    """Resolve the settings for `gpus` GPUs and estimate the time per candidate, without loading anything."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus={gpus!r} is invalid; expected an integer >= 1")
    notes = []

    # pairs: known split sizes of the study's dataset, else unknown until loaded
    known = KNOWN_SPLIT_SIZES.get(settings.dataset, {}).get(settings.train_split)
    if known is not None:
        pairs = min(known, settings.max_train_pairs) if settings.max_train_pairs else known
        source = f"size of the {settings.train_split} split on the dataset card of {settings.dataset}"
        if settings.max_train_pairs:
            source += f", cut to the first {pairs} by max_train_pairs"
    else:
        pairs = settings.max_train_pairs or None
        source = "max_train_pairs" if pairs else f"unknown until {settings.dataset} is loaded"

    # optimizer steps, counted as transformers' Trainer does with a distributed sampler
    effective_batch = settings.per_device_batch_size * settings.gradient_accumulation_steps * gpus
    steps_per_epoch = total_steps = warmup_steps = None
    if pairs is not None:
        batches = math.ceil(math.ceil(pairs / gpus) / settings.per_device_batch_size)
        steps_per_epoch = math.ceil(batches / settings.gradient_accumulation_steps)
        total_steps = math.ceil(settings.num_train_epochs * steps_per_epoch)
        if settings.max_steps:
            total_steps = min(total_steps, settings.max_steps)
        warmup_steps = math.ceil(total_steps * settings.warmup_ratio)
    if effective_batch != STUDY_EFFECTIVE_BATCH:
        accumulation = STUDY_EFFECTIVE_BATCH / (settings.per_device_batch_size * gpus)
        hint = (
            f"--set gradient_accumulation_steps={int(accumulation)}"
            if accumulation.is_integer() and accumulation >= 1
            else "a batch size and accumulation that multiply to it"
        )
        notes.append(f"effective batch {effective_batch} differs from the study's {STUDY_EFFECTIVE_BATCH}; use {hint}")

    # parallelism and the memory it needs for model states (bytes per parameter)
    deepspeed_installed = importlib.util.find_spec("deepspeed") is not None
    sharded = settings.deepspeed == "zero3" and deepspeed_installed and gpus > 1
    if sharded:
        parallelism = f"DeepSpeed ZeRO-3 over {gpus} GPUs"
        # bf16 weights and gradients, float32 master weights and two AdamW moments: 16 bytes, sharded
        state_bytes = (16 * assumptions.parameters + 2 * assumptions.parameters) / gpus
    else:
        parallelism = "one process" if gpus == 1 else f"data parallel over {gpus} GPUs (DDP), unsharded"
        if settings.deepspeed == "zero3" and not deepspeed_installed and gpus > 1:
            notes.append("deepspeed is not installed, so ZeRO-3 is off; install it with `pip install deepspeed`")
        # float32 weights, gradients and two AdamW moments (16 bytes) plus the bf16 reference, on every GPU
        state_bytes = 16 * assumptions.parameters + 2 * assumptions.parameters
    state_gb = state_bytes / 1e9

    estimate = None
    if total_steps is not None:
        estimate = estimate_time(settings, gpus, total_steps, assumptions)
    return Plan(
        preset=preset,
        settings=settings,
        gpus=gpus,
        train_pairs=pairs,
        pairs_source=source,
        effective_batch=effective_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        deepspeed=parallelism,
        model_state_gb_per_gpu=round(state_gb, 1),
        launch=launch_description(gpus, sharded),
        estimate=estimate,
        notes=tuple(notes),
    )


def launch_description(gpus: int, sharded: bool) -> str:
    """Return how the training processes start, in the form of the command line."""
    if gpus == 1:
        return "in the sandbox worker process"
    zero = " (ZeRO-3 from the DeepSpeed config that transformers builds)" if sharded else ""
    return (
        f"accelerate launch --num_processes {gpus} --module evaluators.preference.study_training JOB_SPEC{zero}"
    )


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes >= 2 else f"{seconds:.0f} s"


def format_plan(plan: Plan) -> str:
    """Return the plan as the text that `--dry-run` prints."""
    s = plan.settings
    steps = "unknown" if plan.steps_per_epoch is None else f"{plan.steps_per_epoch} per epoch, {plan.total_steps} in total"
    lines = [
        f"study setup{f' (preset {plan.preset})' if plan.preset else ''}, resolved for {plan.gpus} GPU(s)",
        f"  policy model:     {s.model}",
        f"  reference model:  {s.reference} (frozen)",
        f"  data:             {s.dataset}, train split {s.train_split!r}, held-out split {s.eval_split or 'none'!r}",
        f"  training pairs:   {plan.train_pairs if plan.train_pairs is not None else 'unknown'} ({plan.pairs_source})",
        f"  loss beta:        {s.beta:g}",
        f"  optimizer:        {s.optimizer}, learning rate {s.learning_rate:g}, weight decay {s.weight_decay:g}, "
        f"gradient clipping {s.max_grad_norm:g}",
        f"  schedule:         {s.lr_scheduler}, warmup ratio {s.warmup_ratio:g}"
        + (f" ({plan.warmup_steps} steps)" if plan.warmup_steps is not None else ""),
        f"  epochs:           {s.num_train_epochs:g}" + (f", capped at {s.max_steps} steps" if s.max_steps else ""),
        f"  batch:            {s.per_device_batch_size} per device x {s.gradient_accumulation_steps} accumulation "
        f"x {plan.gpus} GPU(s) = {plan.effective_batch} pairs per step",
        f"  optimizer steps:  {steps}",
        f"  precision:        {'bf16' if s.bf16 else 'float32'}, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}, max length {s.max_length} tokens",
        f"  parallelism:      {plan.deepspeed}, full-parameter training",
        f"  model states:     about {plan.model_state_gb_per_gpu:g} GB per GPU before activations (estimate)",
        f"  launch:           {plan.launch}",
        f"  fitness:          MT-Bench score, mean judge rating (1-10) of both turns; answers of at most "
        f"{s.max_new_tokens} tokens",
    ]
    if plan.estimate is not None:
        e, a = plan.estimate, plan.estimate.assumptions
        lines += [
            f"estimated time per candidate: {_duration(e.total_s)} (an estimate, not a measurement)",
            f"  training:         {_duration(e.train_s)}: {a.mean_sequence_tokens} tokens per sequence, "
            f"{a.parameters:.2g} parameters, {a.gpu_peak_tflops:g} TFLOP/s peak per GPU at {a.utilization:.0%} "
            "utilization",
            f"  answers:          {_duration(e.answer_s)}: {a.questions} questions x 2 turns, decoding bound by "
            f"{a.memory_bandwidth_tbs:g} TB/s memory bandwidth on one GPU",
            f"  judge:            {_duration(e.judge_s)}: {2 * a.questions} requests of {a.judge_latency_s:g} s, "
            f"{a.judge_workers} at a time",
            f"  loading:          {_duration(e.load_s)} (assumed)",
        ]
    else:
        lines.append("estimated time per candidate: unknown until the size of the training data is known")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluators.preference.study",
        description="Print the resolved plan of the DiscoPOP study's setup. Nothing is loaded or downloaded.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (the only action)")
    parser.add_argument("--preset", default="zephyr-7b-gemma", choices=sorted(STUDY_PRESETS),
                        help="study preset (default: zephyr-7b-gemma)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the container (default: 8, as in the study)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override one study setting, e.g. --set beta=0.1 (repeatable)")
    parser.add_argument("--gpu-tflops", type=float, help="dense bf16 peak TFLOP/s of one GPU for the estimate "
                        "(default: 312, an A100)")
    parser.add_argument("--utilization", type=float, help="fraction of the peak that training reaches (default: 0.35)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.cli import parse_setting

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.dry_run:
        parser.print_usage(sys.stderr)
        print("error: only --dry-run is available here; evaluate a candidate with "
              "`evolve heldout RUN_DIR ID --eval mtbench --preset zephyr-7b-gemma`", file=sys.stderr)
        return 2
    try:
        overrides = dict(parse_setting(text) for text in args.settings)
        settings = study_settings(args.preset, overrides)
        assumptions = EstimateAssumptions()
        if args.gpu_tflops is not None:
            assumptions = dataclasses.replace(assumptions, gpu_peak_tflops=args.gpu_tflops)
        if args.utilization is not None:
            assumptions = dataclasses.replace(assumptions, utilization=args.utilization)
        plan = study_plan(settings, args.gpus, assumptions, preset=args.preset)
    except (ValueError, argparse.ArgumentTypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
