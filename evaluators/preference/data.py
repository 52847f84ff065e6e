"""Prompts, preference pairs and the held-out reference score, built once and cached.

The task is positive-sentiment continuation of movie-review openings, the
IMDb sentiment experiment of the DPO paper (Rafailov et al. 2023, section 6
and appendix C.1) at CPU scale. Prompts are plain text that the model
continues, with no chat template. The instruct model then writes review
prose whose VADER score spreads widely (standard deviation 0.46 over 48
samples), while a chat-formatted request often drifts into assistant replies
such as rewrites or stories and makes prompts about 4 times longer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluators.preference.fitness import sample_heldout
from evaluators.preference.reward import sentiment_rewards
from evaluators.preference.sampling import completion_logps, sample_completions, tokenize_prompts
from evaluators.preference.settings import PreferenceSettings
from evaluators.task import ProgressFn

logger = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")

# Bump when the layout or the meaning of the cached data changes.
DATA_FORMAT_VERSION = 1

# Settings that change the cached pairs or the reference score. Training
# settings (beta, learning rate, steps...) are left out so that tuning them
# reuses the cache.
_DATA_SETTINGS = (
    "model",
    "seed",
    "max_prompt_length",
    "max_completion_length",
    "temperature",
    "top_k",
    "generation_batch_size",
    "num_train_prompts",
    "samples_per_prompt",
    "num_heldout_prompts",
    "heldout_samples_per_prompt",
)


@dataclass(frozen=True)
class PromptSplit:
    """Disjoint training and held-out prompts."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


@dataclass
class PreferenceData:
    """Everything `evaluate` reads: training pairs and the held-out prompts with the reference score.

    Attributes:
        pairs: one dict per pair with the text and token ids of prompt, chosen
            and rejected completion, their rewards, and the reference model's
            summed completion log-probs `ref_chosen_logps` and `ref_rejected_logps`.
        heldout_prompt_ids: token ids of each held-out prompt, repeated
            `heldout_samples_per_prompt` times, in sampling order.
        reference_reward: mean reward of the reference model's held-out completions.
        reference_samples: a few reference completions, for reports.
    """

    pairs: list[dict[str, Any]]
    heldout_prompt_ids: list[list[int]]
    reference_reward: float
    reference_samples: list[dict[str, Any]]


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    """Read one prompt per line, skipping blank lines and lines starting with '#'."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def split_prompts(prompts: list[str], num_train: int, num_heldout: int, seed: int) -> PromptSplit:
    """Shuffle the prompts with `seed` and cut disjoint held-out and training sets."""
    unique = list(dict.fromkeys(prompts))
    if num_train + num_heldout > len(unique):
        raise ValueError(
            f"num_train_prompts={num_train} plus num_heldout_prompts={num_heldout} exceeds the "
            f"{len(unique)} distinct prompts in {PROMPTS_FILE.name}; lower one of them"
        )
    random.Random(seed).shuffle(unique)
    heldout = tuple(unique[:num_heldout])
    train = tuple(unique[num_heldout : num_heldout + num_train])
    return PromptSplit(train=train, heldout=heldout)


def data_cache_key(settings: PreferenceSettings, prompts: list[str]) -> str:
    """Return a hash of everything the cached data depends on."""
    fields = {name: getattr(settings, name) for name in _DATA_SETTINGS}
    payload = json.dumps(
        {"version": DATA_FORMAT_VERSION, "settings": fields, "prompts": prompts}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_cache_path(settings: PreferenceSettings, cache_dir: Path) -> Path:
    """Return the JSON file that holds the preference data for these settings."""
    key = data_cache_key(settings, load_prompts())
    return cache_dir / "preference_data" / f"{key}.json"


def build_pairs(
    model, tokenizer, prompts: tuple[str, ...], settings: PreferenceSettings, progress: ProgressFn
) -> list[dict[str, Any]]:
    """Sample reference completions per prompt and pair the highest-reward one with the lowest.

    Prompts whose completions all get the same reward carry no preference and are dropped.
    """
    samples = settings.samples_per_prompt
    prompt_ids = tokenize_prompts(tokenizer, prompts, settings.max_prompt_length)
    repeated = [ids for ids in prompt_ids for _ in range(samples)]
    completions = sample_completions(
        model,
        tokenizer,
        repeated,
        max_new_tokens=settings.max_completion_length,
        temperature=settings.temperature,
        top_k=settings.top_k,
        batch_size=settings.generation_batch_size,
        seed=settings.seed,
        progress=progress,
        progress_message="sampling training pairs",
    )
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards = sentiment_rewards(texts)

    pairs = []
    for index, prompt in enumerate(prompts):
        candidates = range(index * samples, (index + 1) * samples)
        chosen = max(candidates, key=lambda sample: rewards[sample])
        rejected = min(candidates, key=lambda sample: rewards[sample])
        if rewards[chosen] == rewards[rejected]:
            continue
        pairs.append(
            {
                "prompt": prompt,
                "chosen": texts[chosen],
                "rejected": texts[rejected],
                "prompt_ids": prompt_ids[index],
                "chosen_ids": completions[chosen],
                "rejected_ids": completions[rejected],
                "chosen_reward": rewards[chosen],
                "rejected_reward": rewards[rejected],
            }
        )
    logger.info(
        "built %d preference pairs from %d prompts (%d dropped because all their completions tied)",
        len(pairs),
        len(prompts),
        len(prompts) - len(pairs),
    )

    # reference log-probs, computed once here instead of in every evaluation
    pair_prompt_ids = [pair["prompt_ids"] for pair in pairs]
    for column, ids_key in (("ref_chosen_logps", "chosen_ids"), ("ref_rejected_logps", "rejected_ids")):
        logps = completion_logps(
            model,
            pair_prompt_ids,
            [pair[ids_key] for pair in pairs],
            pad_token_id=tokenizer.pad_token_id,
            batch_size=settings.generation_batch_size,
        )
        for pair, value in zip(pairs, logps.tolist()):
            pair[column] = value
    return pairs


def build_preference_data(
    model, tokenizer, settings: PreferenceSettings, progress: ProgressFn
) -> PreferenceData:
    """Build the training pairs and score the reference model on the held-out prompts."""
    split = split_prompts(load_prompts(), settings.num_train_prompts, settings.num_heldout_prompts, settings.seed)
    pairs = build_pairs(model, tokenizer, split.train, settings, progress)
    if not pairs:
        raise ValueError(
            f"every one of the {len(split.train)} training prompts gave completions of equal reward; "
            "raise num_train_prompts, samples_per_prompt or max_completion_length"
        )

    heldout_ids = tokenize_prompts(tokenizer, split.heldout, settings.max_prompt_length)
    heldout_ids = [ids for ids in heldout_ids for _ in range(settings.heldout_samples_per_prompt)]
    samples = sample_heldout(model, tokenizer, heldout_ids, settings, progress)
    reference_reward = sum(samples.rewards) / len(samples.rewards)
    logger.info(
        "reference model: mean held-out reward %.4f over %d completions", reference_reward, len(samples.rewards)
    )
    return PreferenceData(
        pairs=pairs,
        heldout_prompt_ids=heldout_ids,
        reference_reward=reference_reward,
        reference_samples=samples.examples(tokenizer, 4),
    )


def save_preference_data(data: PreferenceData, path: Path) -> None:
    """Write the data as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(dataclasses.asdict(data)), encoding="utf-8")
    staging.replace(path)


def load_preference_data(settings: PreferenceSettings, cache_dir: Path) -> PreferenceData:
    """Read the cached data for these settings, which `prepare` wrote."""
    path = data_cache_path(settings, cache_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"no preference data for these settings in {path}; run the task's prepare step with the same "
            "settings and cache directory first"
        )
    return PreferenceData(**json.loads(path.read_text(encoding="utf-8")))
