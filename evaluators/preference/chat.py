"""Replies of a causal language model to chat conversations, rendered with the model's own chat template."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def render_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Return the token ids of a conversation rendered by the tokenizer's chat template, ready for the reply.

    The template text already contains the special tokens it needs (a BOS for
    Gemma), so the tokenizer adds none of its own.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no chat template; "
            "use a chat or instruct model"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def complete_chats(
    model,
    tokenizer,
    chats: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
) -> list[str]:
    """Return the model's reply to each conversation: sampled at `temperature`, greedy at 0."""
    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    prompts = [render_chat(tokenizer, chat) for chat in chats]
    replies: list[str] = []

    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]

        # left padding, so that every prompt ends where generation starts
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1

        torch.manual_seed(seed + start)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            **sampling,
        )  # (batch, width + new tokens)
        replies.extend(text.strip() for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))

    model.train(was_training)
    return replies
