"""Tool-use data synthesis (docs/synthesis.md): evolved tool variants, agents, templated tasks with
their solutions, an expert policy, a judge filter and the output writer behind ``k2 synth``.

```python
from k2.agentic.synth import SynthOptions, synthesize

card = synthesize(SynthOptions(n=2000, seed=0), "data/agentic")
```
"""

from k2.agentic.synth.agents import Agent, draw_agent
from k2.agentic.synth.evolve import ToolVariant, VariantPool, evolve_tools, held_out, stable_seed
from k2.agentic.synth.expert import ExpertAgent, Played
from k2.agentic.synth.judge import REASONS, regrade, rubric
from k2.agentic.synth.output import episode_domain, load_variants, synthesize
from k2.agentic.synth.pipeline import Synthesizer, SynthOptions, kind_quotas
from k2.agentic.synth.plan import KINDS, Call, Ctx, Draft, Secret, Step
from k2.agentic.synth.templates import Template, template, templates
from k2.agentic.synth.variant_domain import VariantDomain

__all__ = [
    "Agent", "draw_agent",
    "ToolVariant", "VariantPool", "evolve_tools", "held_out", "stable_seed",
    "ExpertAgent", "Played",
    "REASONS", "regrade", "rubric",
    "synthesize", "episode_domain", "load_variants",
    "Synthesizer", "SynthOptions", "kind_quotas",
    "KINDS", "Call", "Ctx", "Draft", "Secret", "Step",
    "Template", "template", "templates",
    "VariantDomain",
]
