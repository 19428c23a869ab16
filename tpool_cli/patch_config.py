"""How a patch behaves besides its operator and schedule, as one value.

Sweep points, result keys and every command carry a :class:`PatchConfig` instead of loose
``prop_attn``/``seed``/``track``/``diagnose`` arguments, so a new patch-wide setting is added here
once. Pure data: no torch import, so the results store and reports can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional


@dataclass(frozen=True)
class PatchConfig:
    """Patch-wide settings.

    ``prop_attn``: add log(token size) to the attention logits after a merge (ToMe's proportional
    attention); ``None`` means the operator's own default (``TokenOperator.default_prop_attn``,
    the reference's setting). ``seed``: random operators' seed. ``track``: keep a source map of
    which original patches each token stands for (costs a gather per reduction). ``diagnose``:
    record the reconstruction error of every reduction (costs an explicit attention).
    """

    prop_attn: Optional[bool] = None
    seed: int = 0
    track: bool = False
    diagnose: bool = False

    def resolve(self, operator: Any) -> "PatchConfig":
        """This config with ``prop_attn`` decided: the operator's default where it was left open."""
        if self.prop_attn is not None:
            return self
        return replace(self, prop_attn=bool(getattr(operator, "default_prop_attn", False)))

    def key_fields(self) -> dict[str, Any]:
        """The settings a result depends on, for result keys (track and diagnose change no logits)."""
        return {"prop_attn": bool(self.prop_attn), "seed": self.seed}
