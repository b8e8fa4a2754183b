"""The recipe registry.

A recipe is a YAML file (``recipes/<name>.yaml`` or any path). When its run needs code,
the YAML names a registered :class:`Recipe` with ``recipe_module: NAME``; a Recipe says
which step strategy trains the config (:meth:`Recipe.strategy`; the gradient
:class:`~neuroplastic.training.trainer.Trainer` by default) and which callbacks it adds
to the trainer (:meth:`Recipe.callbacks`). Nothing outside this package special-cases a
recipe. The built-in ones: ``cot``, ``controlled_generation``, ``recall``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from neuroplastic.config import RunConfig
from neuroplastic.errors import UserError


class Recipe:
    """A recipe's code. Override :meth:`callbacks` to add callbacks to the trainer, and
    :meth:`strategy` when the step itself differs (e.g. the needle-recall step)."""

    def strategy(self, cfg: RunConfig, echo: Callable[[str], None] | None = None) -> Any:
        """The step strategy that trains ``cfg`` (not yet set up)."""
        from neuroplastic.training.trainer import Trainer

        return Trainer(cfg, echo=echo)

    def callbacks(self, ctx: Any) -> list:
        """Callbacks for the gradient trainer, built during its setup, once the model, data
        and plasticity engine exist. ``ctx`` is the run's
        :class:`~neuroplastic.training.callbacks.StepContext` (its ``logger`` is not open
        yet); ``ctx.use_data`` replaces the training and validation data."""
        return []

    def reward(self, cfg: RunConfig, tokenizer: Any = None) -> Any:
        """The reward a run of this recipe trains with (what ``evaluate --task rewards``
        scores with): by default the config's ``reward.weights``."""
        from neuroplastic.rewards import MultiObjectiveReward

        return MultiObjectiveReward(dict(cfg.reward.weights))


_REGISTRY: dict[str, Recipe] = {}


def register(name: str, recipe: Recipe) -> Recipe:
    """Make ``recipe`` the code of ``recipe_module: name``."""
    _REGISTRY[name] = recipe
    return recipe


def _builtin() -> None:
    from neuroplastic.recipes import controlled_generation, cot, recall

    register("controlled_generation", controlled_generation.RECIPE)
    register("cot", cot.RECIPE)
    register("recall", recall.RECIPE)


def get_recipe(name: str) -> Recipe:
    """The Recipe registered as ``name`` (``""``: the plain gradient trainer)."""
    if not name:
        return Recipe()
    if name not in _REGISTRY:
        _builtin()
    if name not in _REGISTRY:
        raise UserError(
            f"recipe_module {name!r} does not exist in neuroplastic.recipes; known: "
            f"{', '.join(sorted(_REGISTRY))} (or register one with neuroplastic.recipes.register)."
        )
    return _REGISTRY[name]


def reward_for(cfg: RunConfig, tokenizer: Any = None) -> Any:
    """The reward a run of ``cfg`` trains with (its recipe's :meth:`Recipe.reward`)."""
    return get_recipe(cfg.recipe_module).reward(cfg, tokenizer)


def strategy_for(cfg: RunConfig, echo: Callable[[str], None] | None = None) -> Any:
    """The step strategy that trains ``cfg`` (its recipe's, not yet set up)."""
    return get_recipe(cfg.recipe_module).strategy(cfg, echo)
