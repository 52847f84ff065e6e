"""Fingerprints that find a repeated candidate before any sandbox time is spent on it.

`canonical_fingerprint` hashes a normalised syntax tree (see
`engine.canonical_ast`), so programs that differ only in names, comments,
docstrings, annotations, literal spelling or the study's method form
(`self.beta`) versus a `beta` parameter share one fingerprint.
`behavioural_fingerprint` hashes the loss values a task's unit test measured
on fixed probe inputs, so it also catches rewrites that the syntax tree
cannot show are equal.

Candidate code is parsed here, never compiled or run.
"""

from __future__ import annotations

import ast
import hashlib
import math
from collections.abc import Collection, Iterable

from engine.canonical_ast import canonicalize_tree, normalize_tree


def canonical_fingerprint(code: str, hyperparameters: Collection[str] = ()) -> str | None:
    """Return the sha256 hex digest of the canonical form of `code`, or None if it does not parse.

    `hyperparameters` are the names a candidate may read as `self.<name>` or
    as a parameter, such as ("beta",). Passing them makes both forms match.
    """
    form = canonical_form(code, hyperparameters)
    if form is None:
        return None
    return hashlib.sha256(form.encode("utf-8")).hexdigest()


def canonical_form(code: str, hyperparameters: Collection[str] = ()) -> str | None:
    """Return the normalised source whose hash is the canonical fingerprint, or None if it does not parse.

    NOTE: the form comes from `ast.unparse`, whose output may change between
    Python minor versions, so fingerprints are comparable only within one.
    """
    tree = normalize_tree(code, hyperparameters)
    if tree is None:
        return None
    return ast.unparse(canonicalize_tree(tree))


def behavioural_fingerprint(values: Iterable[float], decimals: int = 5) -> str:
    """Return the sha256 hex digest of probe values rounded to `decimals` places.

    -0.0 and 0.0 hash alike, every NaN hashes alike, and nested lists are
    flattened in order.
    """
    if decimals < 0:
        raise ValueError(f"decimals is {decimals}; expected 0 or more")
    parts = [_format_probe_value(value, decimals) for value in _flatten(values)]
    return hashlib.sha256(",".join(parts).encode("ascii")).hexdigest()


def _flatten(values: Iterable[object]) -> Iterable[object]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flatten(value)
        else:
            yield value


def _format_probe_value(value: object, decimals: int) -> str:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"probe value {value!r} is a {type(value).__name__}; expected a number")
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    text = f"{number:.{decimals}f}"
    if float(text) == 0.0:
        # rounding leaves "-0.00000" for tiny negative values
        text = f"{0.0:.{decimals}f}"
    return text
