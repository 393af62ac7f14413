"""Turn what a layout scanner found into a ScanResult: valid names only, no duplicates, sorted."""

from __future__ import annotations

from ..errors import InvalidArgument
from ..paths import check_model_name
from .types import Model, Problem, ScanResult


def assemble(found: list[tuple[str, Model]], problems: list[Problem]) -> ScanResult:
    """``found`` pairs each model with the rel it was found at (for messages).

    A model whose name is not a valid model name, or whose name an earlier model (in
    ``found`` order) already took, is left out and reported in ``ScanResult.problems``.
    """
    models: dict[str, Model] = {}
    origin: dict[str, str] = {}
    for rel, model in found:
        try:
            check_model_name(model.name)
        except InvalidArgument as exc:
            problems.append(Problem(rel, f"{exc}; not listed"))
            continue
        if model.name in models:
            problems.append(
                Problem(rel, f"model name {model.name!r} is already taken by {origin[model.name]}")
            )
            continue
        models[model.name] = model
        origin[model.name] = rel
    return ScanResult(models=dict(sorted(models.items())), problems=problems)
