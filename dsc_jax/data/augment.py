"""The paper's text transform (its reference code): line filter plus seeded ``Calc:`` lines."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Exact format of an inserted line: three addends in 0..99 and their sum.
CALC_LINE_RE = re.compile(r"^Calc: (\d{1,2}) \+ (\d{1,2}) \+ (\d{1,2}) = (\d{1,3})$")


def paper_augment(
    text: str, *, calc_prob: float, min_line_chars: int, seed: Sequence[int] | int
) -> str:
    """Keep lines longer than ``min_line_chars``; after each, maybe insert a ``Calc:`` line.

    Lines are split on ``"\\n"``. After each kept line, with probability ``calc_prob`` (one
    Bernoulli draw per kept line), the line ``f"Calc: {a} + {b} + {c} = {a + b + c}"`` follows,
    ``a, b, c`` uniform in ``0..99``. The result is the kept and inserted lines joined by
    ``"\\n"`` (no trailing newline). Deterministic given ``seed`` (``np.random.default_rng``).

    Args:
      text: raw text.
      calc_prob: insertion probability in ``[0, 1)``.
      min_line_chars: a line is kept when ``len(line) > min_line_chars``.
      seed: seed (or seed sequence) of the draws.

    Returns:
      The transformed text.
    """
    lines = [line for line in text.split("\n") if len(line) > min_line_chars]
    rng = np.random.default_rng(seed)
    insert = rng.random(len(lines)) < calc_prob
    addends = rng.integers(0, 100, size=(int(insert.sum()), 3)).tolist()
    out: list[str] = []
    k = 0
    for line, ins in zip(lines, insert.tolist(), strict=True):
        out.append(line)
        if ins:
            a, b, c = addends[k]
            k += 1
            out.append(f"Calc: {a} + {b} + {c} = {a + b + c}")
    return "\n".join(out)


def paper_slices(
    train_tokens: np.ndarray, validation_tokens: np.ndarray, train_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """The reference pipeline's split: first ``train_fraction`` of the train-text tokens, and
    the tokens of the validation text after its first ``train_fraction`` (its last 10 % by
    default).

    Args:
      train_tokens: ``[N_train]`` tokens of the (augmented) train text.
      validation_tokens: ``[N_valid]`` tokens of the (augmented) validation text.
      train_fraction: the cut, in ``(0, 1)``.

    Returns:
      ``(train [int(N_train * f)], validation [N_valid - int(N_valid * f)])``.
    """
    cut_train = int(len(train_tokens) * train_fraction)
    cut_valid = int(len(validation_tokens) * train_fraction)
    return train_tokens[:cut_train], validation_tokens[cut_valid:]
