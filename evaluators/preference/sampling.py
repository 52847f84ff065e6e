"""Sampling completions from a causal language model and scoring their log-probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evaluators.task import ProgressFn


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int) -> list[list[int]]:
    """Tokenize plain-text prompts without special tokens, keeping the last `max_prompt_length` tokens."""
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [ids[-max_prompt_length:] for ids in encoded]


def _trim_after_eos(ids: list[int], eos_token_id: int) -> list[int]:
    """Cut a sampled completion after its first EOS token, which is kept."""
    if eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1]
    return ids


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    batch_size: int,
    seed: int,
    progress: ProgressFn | None = None,
    progress_message: str = "sampling completions",
) -> list[list[int]]:
    """Sample one completion per prompt and return its token ids, cut after EOS.

    The generator is seeded once, so two models of the same architecture given
    the same prompts and seed draw the same uniform numbers at every position.
    Two nearly equal policies therefore produce nearly equal samples, which
    lowers the noise when their rewards are compared.
    """
    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    completions: list[list[int]] = []
    total = len(prompt_ids)

    for start in range(0, total, batch_size):
        batch = prompt_ids[start : start + batch_size]

        # left padding, so every prompt ends where generation starts
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1

        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # (batch, width + new tokens)
        for row in output[:, width:].tolist():
            completions.append(_trim_after_eos(row, tokenizer.eos_token_id))
        if progress is not None:
            progress(min(start + batch_size, total), total, progress_message)

    model.train(was_training)
    return completions


@torch.no_grad()
def completion_logps(
    model,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    *,
    pad_token_id: int,
    batch_size: int,
) -> torch.Tensor:
    """Return log p(completion | prompt) summed over completion tokens, shape (N,), float32 on CPU.

    The model must carry TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`),
    which `load_model` adds, so these sums equal the ones `DPOTrainer` computes
    for the same sequences.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = []

    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        completions = completion_ids[start : start + batch_size]

        # right padding, as in trl's DataCollatorForPreference
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            sequence = torch.tensor(prompt + completion)
            input_ids[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
            labels[row, len(prompt) : len(sequence)] = torch.tensor(completion)

        output = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            labels=labels.to(device),
            use_cache=False,
            fused_lm_head=True,
        )
        sums.append(output.log_probs.sum(dim=1).float().cpu())  # (batch,); zero at masked positions

    model.train(was_training)
    return torch.cat(sums)
