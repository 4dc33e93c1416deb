"""Fan-out: one request runs its inputs through several fine-tunes (or all that can do the task) and answers for each.

`POST /predict`, `/embed` and `/score` take `"models": ["a", "b"]` (or `"*"`: every served model that can do the
task, the base included) instead of `model`; the answer is then `{name: answer}`, each answer what the route gives
for that model alone, in the order asked. The inputs are tokenized once and all the (input, model) rows are
submitted together, so they run in one batch: the base's prefix runs once per distinct input, up to the smallest
boundary among the models, and then once per larger boundary (`ServingEngine._boundary_states`); only each model's
own suffix runs per model. With `truncate`, inputs are cut to the smallest positions among the models.
"""

from __future__ import annotations

from typing import Any

from .engine import ServedModel, ServingEngine
from .requests import ServingError, WrongTaskError

ALL = "*"


def fanout_models(engine: ServingEngine, body: Any, task: str) -> list[ServedModel]:
    """The served models a request body names for `task`: its `model` (absent: the base), or its fan-out `models`
    (a list of names, duplicates dropped, or `"*"`).

    Raises:
        `UnknownModelError` / `WrongTaskError`: a named model is not served, or cannot do `task`.
        `ServingError`: both `model` and `models` are given.
    """
    names = getattr(body, "models", None)
    if names is None:
        return [engine.model_for(body.model, task)]
    if body.model is not None:
        raise ServingError("Send either `model` (one model) or `models` (a fan-out), not both.")
    if names == ALL:
        served = [m for m in list(engine.models.values()) if task in m.tasks]
        if not served:
            raise WrongTaskError(f"No served model can {task}.")
        return served
    return [engine.model_for(name, task) for name in dict.fromkeys(names)]
