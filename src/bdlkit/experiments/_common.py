"""Pieces shared by several recipes."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..posterior.swag import swa_learning_rate


def progress(tag: str, msg: str) -> None:
    """One line of a recipe's progress, ``[tag] msg``, on stderr (stdout is left to results).

    Example:
        >>> progress("sbp", "epoch 1 done")  # prints "[sbp] epoch 1 done" to stderr
    """
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def garipov_schedule(total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor of Garipov et al.'s SGD schedule: flat 50 %, linear to 1 % by 90 %.

    It is the reference SWAG schedule with the whole run as the pre-SWA budget.

    Example:
        >>> garipov_schedule(100)(95)
        0.01
    """
    return lambda i: swa_learning_rate(i / total_steps, lr_init=1.0, swa_lr=0.01, swa_start=1.0)
