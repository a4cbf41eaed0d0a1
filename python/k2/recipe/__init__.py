"""``k2 recipe``: pretraining, synthesis, SFT and RL in one resumable command, evaluated after
every stage, with a self-contained HTML report (docs/recipe.md).

``config`` reads and checks the recipe's TOML file; ``stages`` runs each stage's own ``k2``
command and keeps its completion marker; ``evaluate`` measures each stage's model with k2's
evaluators; ``report`` writes the stage table and ``report.html``; ``run`` puts them in order.
"""

from k2.recipe.config import DEFAULT_CONFIG, QUICK_CONFIG, RecipeConfig, load
from k2.recipe.run import RecipeResult, run

__all__ = ["DEFAULT_CONFIG", "QUICK_CONFIG", "RecipeConfig", "RecipeResult", "load", "run"]
