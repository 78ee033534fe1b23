"""End-to-end recipes, one module per method. Each exposes ``run(out_dir, quick, seed) -> dict``.

Nothing in the library imports this package; the CLI composes it with the public API.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Order matters: `bdlkit run all` runs them in this order.
RECIPES: dict[str, str] = {
    "baseline": "bdlkit.experiments.baseline",
    "swag": "bdlkit.experiments.swag",
    "fge": "bdlkit.experiments.fge",
    "curves": "bdlkit.experiments.curves",
    "sbp": "bdlkit.experiments.sbp",
    "perforation": "bdlkit.experiments.perforation",
    "trip": "bdlkit.experiments.trip",
    "imh": "bdlkit.experiments.imh",
}

Recipe = Callable[..., dict[str, Any]]


def get_recipe(name: str) -> Recipe:
    """The ``run`` function of recipe ``name``; ``KeyError`` for an unknown name.

    Example:
        >>> callable(get_recipe("baseline"))
        True
    """
    if name not in RECIPES:
        raise KeyError(name)
    return importlib.import_module(RECIPES[name]).run


def run_recipe(name: str, out_dir: Path, quick: bool, seed: int) -> dict[str, Any]:
    """Run one recipe into ``out_dir/<name>`` and return its result dict.

    ``bdlkit run NAME`` calls this and then writes the report; ``KeyError`` for an unknown name.

    Example:
        >>> result = run_recipe("baseline", Path("runs/x"), quick=True, seed=0)  # doctest: +SKIP
        >>> sorted(result)[:3]  # doctest: +SKIP
        ['config', 'figures', 'headline']
    """
    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    return get_recipe(name)(target, quick=quick, seed=seed)
