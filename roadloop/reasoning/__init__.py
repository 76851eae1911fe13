"""Chain-of-Causation (CoC) reasoning: meta-actions, ground-truth labels and text checks.

See docs/reasoning.md for the decision / component grammar.
"""

from roadloop.reasoning.checks import (
    ParsedCoC,
    consistency,
    consistency_batch,
    grounding,
    grounding_batch,
    parse_coc,
)
from roadloop.reasoning.labels import CoCLabel, Component, coc_labels
from roadloop.reasoning.meta_action import Lateral, Longitudinal, meta_actions

__all__ = ["CoCLabel", "Component", "Lateral", "Longitudinal", "ParsedCoC", "coc_labels", "consistency",
           "consistency_batch", "grounding", "grounding_batch", "meta_actions", "parse_coc"]
