"""Per-layer token budgets: which blocks reduce, and to how many patch tokens.

Three ways to say it, as in the literature:

* ``keep`` with ``layers``: the reduction blocks (0-indexed; default 3, 6, 9 on 12-block models as
  DynamicViT and EViT use, in general floor(depth * j / 4) for j = 1, 2, 3) each keep fraction ``keep`` of the patch tokens, compounded: after the k-th reduction
  ``floor(N0 * keep**k)`` patch tokens remain (N0 = patch tokens of the input, 196 for a 224 px
  /16 model). This is the convention of the public token-reduction benchmark, so our counts line
  up with published tables. Prefix tokens (class, distillation, registers) come on top.
* ``tokens``: explicit patch-token budgets, either one per reduction layer (same length as
  ``layers``) or one per block (length = depth).
* ``r``: remove r patch tokens in every block (ToMe's ``model.r``), or r_i in block i (one value
  per block). Relative to each block's actual input, so an operator's cap in one block (ToMe
  merges at most half) does not make a later block remove more.

Budgets are targets: an operator may realise fewer (grid pooling rounds to a grid, ToMe can merge
at most half the tokens per block); the profile shows what was actually kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from .errors import TpoolError


@dataclass(frozen=True)
class Schedule:
    """Where and how much a patched model reduces. Pure data; validated on construction."""

    keep: Optional[float] = None
    layers: Optional[tuple[int, ...]] = None  # None: default_layers(depth)
    tokens: Optional[tuple[int, ...]] = None
    # tokens removed per block: (r,) = r in every block (ToMe's model.r), or one value per block
    r: Optional[Union[int, tuple[int, ...]]] = None

    def __post_init__(self) -> None:
        if isinstance(self.r, int):
            object.__setattr__(self, "r", (self.r,))
        if sum(v is not None for v in (self.keep, self.tokens, self.r)) != 1:
            raise TpoolError("give exactly one of a keep rate, a token budget or r (tokens removed per block)")
        if self.r is not None:
            if not self.r or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in self.r):
                raise TpoolError(f"r must be integers >= 0 (tokens removed per block), got {list(self.r)}")
            if self.layers is not None:
                raise TpoolError("--layers goes with --keep or --tokens; --r gives one value, or one per block")
        if self.keep is not None and not (0.0 < self.keep <= 1.0):
            raise TpoolError(f"keep rate must be in (0, 1], got {self.keep:g}")
        if self.layers is not None:
            if not self.layers:
                raise TpoolError("--layers is empty")
            if any(layer < 0 for layer in self.layers):
                raise TpoolError(f"layers are 0-indexed block numbers, got {list(self.layers)}")
            if len(set(self.layers)) != len(self.layers) or list(self.layers) != sorted(self.layers):
                raise TpoolError(f"layers must be increasing without repeats, got {list(self.layers)}")
        if self.tokens is not None:
            if any(t < 1 for t in self.tokens):
                raise TpoolError(f"token budgets must be >= 1, got {list(self.tokens)}")
            if any(b > a for a, b in zip(self.tokens, self.tokens[1:])):
                raise TpoolError(f"token budgets must be non-increasing, got {list(self.tokens)}")

    @property
    def is_identity(self) -> bool:
        """True when the schedule can never reduce (keep rate 1.0, r = 0)."""
        return self.keep == 1.0 or (self.r is not None and not any(self.r))

    def removals(self, depth: int) -> dict[int, int]:
        """Block index -> tokens that block removes (r schedules only; empty otherwise)."""
        if self.r is None:
            return {}
        per_block = self.r * depth if len(self.r) == 1 else self.r
        return {i: v for i, v in enumerate(per_block) if v > 0}

    def reduction_layers(self, depth: int) -> tuple[int, ...]:
        """The blocks that reduce on a model of this depth."""
        if self.r is not None:
            return tuple(self.removals(depth))
        if self.tokens is not None and len(self.tokens) == depth and (self.layers is None or len(self.layers) != depth):
            return tuple(range(depth))
        return self.layers if self.layers is not None else default_layers(depth)

    def validate(self, depth: int, num_patches: int) -> None:
        """Check the schedule against a model: layers in range, budgets within the patch count."""
        if self.r is not None:
            if len(self.r) not in (1, depth):
                raise TpoolError(f"--r has {len(self.r)} values: give one (every block) or one per block ({depth})")
            return
        layers = self.reduction_layers(depth)
        bad = [layer for layer in layers if layer >= depth]
        if bad:
            raise TpoolError(f"layer {bad[0]} is out of range: the model has {depth} blocks (0..{depth - 1})")
        if self.tokens is not None:
            if len(self.tokens) != len(layers):
                raise TpoolError(
                    f"--tokens has {len(self.tokens)} budgets: give one per reduction layer "
                    f"({len(layers)}: {','.join(map(str, layers))}) or one per block ({depth})"
                )
            if self.tokens[0] > num_patches:
                raise TpoolError(f"token budget {self.tokens[0]} exceeds the {num_patches} patch tokens of the model")

    def targets(self, depth: int, num_patches: int) -> dict[int, int]:
        """Block index -> target patch-token count after that block (only blocks that may reduce)."""
        self.validate(depth, num_patches)
        if self.r is not None:
            return {}  # relative: see removals()
        layers = self.reduction_layers(depth)
        if self.tokens is not None:
            return dict(zip(layers, self.tokens))
        assert self.keep is not None
        return {
            layer: max(1, math.floor(num_patches * self.keep ** (stage + 1) + 1e-9))
            for stage, layer in enumerate(layers)
        }

    def describe(self, depth: int) -> str:
        """Short human-readable form for tables and result rows, e.g. 'keep=0.7@3,6,9', 'r=13'."""
        if self.r is not None:
            return f"r={','.join(map(str, self.r))}"
        layers = ",".join(map(str, self.reduction_layers(depth)))
        if self.tokens is not None:
            return f"tokens={','.join(map(str, self.tokens))}@{layers}"
        return f"keep={self.keep:g}@{layers}"


def default_layers(depth: int) -> tuple[int, ...]:
    """floor(depth * j / 4) for j = 1, 2, 3: blocks 3, 6, 9 of a 12-block ViT, 1, 3, 4 of a 6-block one."""
    return tuple(sorted({max(0, depth * j // 4) for j in (1, 2, 3)}))


def parse_int_list(text: Optional[str], what: str) -> Optional[tuple[int, ...]]:
    """Parse '3,6,9' into (3, 6, 9) with a clear error naming the option."""
    if text is None or text.strip() == "":
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip() != "")
    except ValueError:
        raise TpoolError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_r(text: Optional[str], sweep: bool) -> Optional[list[tuple[int, ...]]]:
    """``--r`` text -> one r tuple per schedule: (R,) = R in every block, (R1, R2, ...) one per block.

    ';' separates schedules, each 'R' or 'R1,R2,...'. Without ';', a command that sweeps
    (``sweep``: pareto, profile, bench, recon) reads 'R1,R2,...' as one point per value, as it reads
    --keep; a command that runs one schedule reads it as the per-block list.
    """
    if text is None or text.strip() == "":
        return None
    parts = [part for part in text.split(";") if part.strip() != ""] if ";" in text else None
    if parts is None:
        values = parse_int_list(text, "--r") or ()
        parts_r = [(v,) for v in values] if sweep else [values]
    else:
        parts_r = [parse_int_list(part, "--r") or () for part in parts]
    if not parts_r or not all(parts_r):
        raise TpoolError(f"--r is empty: give R, R1,R2,... or schedules separated by ';', got {text!r}")
    bad = [v for r in parts_r for v in r if v < 0]
    if bad:
        raise TpoolError(f"--r values are tokens removed per block, integers >= 0, got {bad[0]}")
    return parts_r


def parse_float_list(text: str, what: str) -> tuple[float, ...]:
    """Parse '0.9,0.7' into (0.9, 0.7) with a clear error naming the option."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip() != "")
    except ValueError:
        raise TpoolError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise TpoolError(f"{what} is empty")
    return values
