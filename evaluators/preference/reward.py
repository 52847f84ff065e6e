"""The reward of the sentiment task: VADER compound score of a completion."""

from __future__ import annotations

import functools
from collections.abc import Sequence


@functools.lru_cache(maxsize=1)
def _analyzer():
    # vaderSentiment ships its lexicon inside the wheel, so this reads no network.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_rewards(texts: Sequence[str]) -> list[float]:
    """Return the VADER compound score of each text, from -1 (negative) to 1 (positive).

    VADER (Hutto and Gilbert 2014) is a rule-based scorer, so the reward is
    deterministic and cheap on a CPU, unlike a learned sentiment classifier.
    """
    analyzer = _analyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]
