"""TRL's DPOTrainer with a pluggable per-example loss, and the training run of one candidate."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from evaluators.preference.model import freeze_lower_layers
from evaluators.preference.settings import PreferenceSettings
from evaluators.task import CandidateRejected, ProgressFn

logger = logging.getLogger(__name__)

# loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
# reference_rejected_logps) -> per-example losses of shape (B,).
PairLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class CandidateDPOTrainer(DPOTrainer):
    """DPOTrainer that computes its loss with a plain callable instead of a built-in `loss_type`.

    Args:
        loss_fn: called as `loss_fn(policy_chosen_logps, policy_rejected_logps,
            reference_chosen_logps, reference_rejected_logps)` with tensors of
            shape (B,) that hold each completion's summed token log-probs. It
            returns one loss per example, shape (B,), and the trainer minimizes
            their mean. Bind hyperparameters first, for example
            `functools.partial(sigmoid_loss, beta=0.1)`.
        *args, **kwargs: passed to `trl.DPOTrainer`. `args.loss_type` and
            `args.loss_weights` are ignored; `ld_alpha`, a non-default
            `f_divergence_type` and `use_weighting` are rejected.

    Datasets that already contain `prompt_ids`, `chosen_ids` and `rejected_ids`
    are used as they are, so training sees the exact sampled tokens instead of
    a re-tokenization of decoded text. Columns `ref_chosen_logps` and
    `ref_rejected_logps` serve as the reference log-probs, and the reference
    model is then not run during training. Without them, pass `ref_model` or
    set `precompute_ref_log_probs=True`.

    A non-finite loss or gradient norm stops training at once with
    `CandidateRejected(category="nan", stage="train")`, before the optimizer
    writes NaN into the weights.
    """

    def __init__(self, *args: Any, loss_fn: PairLossFn, **kwargs: Any) -> None:
        config = kwargs.get("args")
        if config is not None:
            unsupported = []
            if config.ld_alpha is not None:
                unsupported.append(f"ld_alpha={config.ld_alpha}")
            if config.f_divergence_type != "reverse_kl":
                unsupported.append(f"f_divergence_type={config.f_divergence_type!r}")
            if config.use_weighting:
                unsupported.append("use_weighting=True")
            if unsupported:
                raise ValueError(
                    f"CandidateDPOTrainer does not support {', '.join(unsupported)}: loss_fn receives plain summed "
                    "log-probs, so express such variants inside loss_fn"
                )
        self.loss_fn = loss_fn
        super().__init__(*args, **kwargs)

        # DPOTrainer's fused LM head also computes entropy, mean logits and
        # top-1 hits for metrics that this trainer does not log. Patching the
        # head again for log-probs only saves about a tenth of a CPU step.
        if not is_peft_model(self.model):
            add_fused_lm_head(self.model, outputs=("log_probs",))

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if all(column in dataset.column_names for column in _PAIR_COLUMNS):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if all(column in dataset.column_names for column in _REFERENCE_COLUMNS):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _reference_logps(self, inputs, model_kwargs, labels, seq_len):
        """Return the reference log-probs (chosen, rejected), from the batch or from `ref_model`."""
        if all(column in inputs for column in _REFERENCE_COLUMNS):
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.ref_model is None:
            raise ValueError(
                "the batch has no ref_chosen_logps/ref_rejected_logps and the trainer has no ref_model; "
                "pass ref_model or set precompute_ref_log_probs=True"
            )
        with torch.no_grad():
            ref_outputs = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        return ref_outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"

        # policy log-probs of each completion, summed over its tokens, as DPOTrainer does
        non_model_keys = ("completion_mask", *_REFERENCE_COLUMNS)
        model_kwargs = {key: value for key, value in inputs.items() if key not in non_model_keys}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)  # (2B,); zero outside the completion
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # batch is [chosen..., rejected...]
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(inputs, model_kwargs, labels, seq_len)
        ref_chosen_logps = ref_chosen_logps.to(chosen_logps.device, chosen_logps.dtype)
        ref_rejected_logps = ref_rejected_logps.to(rejected_logps.device, rejected_logps.dtype)

        # the candidate loss, one value per pair
        per_example = self.loss_fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        step = self.state.global_step + 1
        if not isinstance(per_example, torch.Tensor) or per_example.shape != chosen_logps.shape:
            shape = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else type(per_example).__name__
            raise CandidateRejected(
                f"at training step {step} the loss returned {shape}, expected shape {tuple(chosen_logps.shape)}: "
                "return one loss per example",
                category="shape",
                stage="train",
            )
        loss = per_example.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        if not torch.isfinite(loss):
            bad_rows = torch.nonzero(~torch.isfinite(per_example.detach())).flatten().tolist()
            raise CandidateRejected(
                f"loss is {loss.item()} at training step {step} (non-finite in rows {bad_rows} of the batch). "
                "Guard divisions, logs and exponentials against extreme log-prob margins",
                category="nan",
                stage="train",
            )

        # metrics with DPO's implicit reward beta * log(pi / pi_ref) (Rafailov et al. 2023, eq. 5)
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps).detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["logps/chosen"].append(chosen_logps.detach().mean().item())
        metrics["logps/rejected"].append(rejected_logps.detach().mean().item())

        if return_outputs:
            return loss, outputs
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(value):
            raise CandidateRejected(
                f"gradient norm is {value} at training step {self.state.global_step + 1} although the loss is "
                "finite, so the loss has an infinite or NaN derivative somewhere (for example sqrt or log at 0)",
                category="nan",
                stage="train",
            )
        return grad_norm


class _ProgressCallback(TrainerCallback):
    """Reports each optimizer step to the task's progress function."""

    def __init__(self, progress: ProgressFn, total: int) -> None:
        self._progress = progress
        self._total = total

    def on_step_end(self, args, state, control, **kwargs):
        self._progress(state.global_step, self._total, "training")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logger.debug("step %d: %s", state.global_step, logs)


@dataclass
class TrainingResult:
    """Outcome of one training run."""

    loss_curve: list[float]
    steps: int
    train_s: float
    trainable_parameters: int
    final_metrics: dict[str, float] = field(default_factory=dict)


def dpo_config(settings: PreferenceSettings, output_dir: Path, seed: int) -> DPOConfig:
    """Build the DPOConfig of a run: no checkpoints, no reporting, one log line per step."""
    return DPOConfig(
        output_dir=str(output_dir),
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_grad_norm=settings.max_grad_norm,
        # transformers 5 calls gradient checkpointing "activation checkpointing"
        activation_checkpointing=settings.gradient_checkpointing,
        max_length=None,  # prompts and completions are already cut to their limits
        precompute_ref_log_probs=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        # bfloat16 autocast where the GPU supports it; float32 on CPU
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
    )


def train_candidate(
    loss_fn: PairLossFn,
    policy,
    reference,
    tokenizer,
    pairs: list[dict[str, Any]],
    settings: PreferenceSettings,
    output_dir: Path,
    seed: int,
    progress: ProgressFn,
) -> TrainingResult:
    """Fine-tune `policy` in place on the preference pairs with `loss_fn`."""
    columns = (*_PAIR_COLUMNS, *_REFERENCE_COLUMNS)
    dataset = Dataset.from_list([{column: pair[column] for column in columns} for pair in pairs])
    trainable = freeze_lower_layers(policy, settings.trainable_layers, settings.freeze_embeddings)
    # The pairs carry reference log-probs, so `reference` never runs here. It
    # is passed because DPOTrainer would otherwise load a second copy.
    trainer = CandidateDPOTrainer(
        model=policy,
        ref_model=reference,
        args=dpo_config(settings, output_dir, seed),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[_ProgressCallback(progress, settings.max_steps)],
        loss_fn=loss_fn,
    )
    # per-step logs go to the module logger instead of stdout
    trainer.remove_callback(PrinterCallback)

    start = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - start

    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    final = {}
    if step_logs:
        final = {key: value for key, value in step_logs[-1].items() if key.startswith(("rewards/", "logps/"))}
    return TrainingResult(
        loss_curve=[entry["loss"] for entry in step_logs],
        steps=trainer.state.global_step,
        train_s=train_s,
        trainable_parameters=trainable,
        final_metrics=final,
    )
