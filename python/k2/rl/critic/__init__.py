"""The self-critique rubric reward: a pairwise critic kept honest by verifiable rewards
(docs/critic.md).

* :mod:`~k2.rl.critic.rubrics` — rubrics as data: core, prescriptive, per task, from JSON files;
* :mod:`~k2.rl.critic.checks` — programmatic checks of mandatory rubrics and the reward cap;
* :mod:`~k2.rl.critic.aggregate` — pairwise judgements to per-sample rewards (win rate,
  Bradley–Terry) and which pairs are compared;
* :mod:`~k2.rl.critic.prompt` — the critic's prompt in the chat format;
* :mod:`~k2.rl.critic.critic` — :class:`Critic`: a k2 model judging both orders of a pair from
  the probabilities of its answer tokens ``A``/``B``, and its training loss;
* :mod:`~k2.rl.critic.closed_loop` — preference pairs from verifiable samples, the pair buffer,
  the critic's own optimizer, critic–verifier agreement;
* :mod:`~k2.rl.critic.bootstrap` — synthesized preference pairs as an SFT mix;
* :mod:`~k2.rl.critic.bait` — the opening-praise bait prompts;
* :mod:`~k2.rl.critic.job` — ``k2 rl`` with critic-rewarded prompts (``--critic-share``);
* :mod:`~k2.rl.critic.settings` — the ``--critic-*`` settings' help and checks.

The modules that need torch are imported on their own (``from k2.rl.critic.critic import Critic``).
"""

from k2.rl.critic.aggregate import aggregate, bradley_terry, pair_schedule, win_rates
from k2.rl.critic.checks import cap_rewards, opening_praise, self_justification, violations
from k2.rl.critic.rubrics import CORE_RUBRICS, PRESCRIPTIVE_RUBRICS, TASK_RUBRICS, Rubric, load_rubrics, rubrics_for

__all__ = [
    "Rubric", "CORE_RUBRICS", "PRESCRIPTIVE_RUBRICS", "TASK_RUBRICS", "load_rubrics", "rubrics_for",
    "opening_praise", "self_justification", "violations", "cap_rewards",
    "aggregate", "win_rates", "bradley_terry", "pair_schedule",
]
