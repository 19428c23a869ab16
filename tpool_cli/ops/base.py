"""The operator interface: what every token-reduction method takes and returns.

An operator sees the *patch* tokens of one block (prefix tokens are split off by the patch
mechanism and never reach it), the target count K, and a :class:`ReduceContext` with whatever
the block computed for it (significance scores, keys, the sizes of the tokens). It returns a
:class:`Reduction`: K tokens, their sizes and, when asked, the assignment of every input token to
an output token. Operators are frozen dataclasses whose fields are their options; their tensor
work lives in pure functions next to them. No hidden state, no Python loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Optional

import torch

# Features a block can compute for an operator, only when the operator asks for them:
CLS_ATTN = "cls_attn"  # B x N: attention the class token pays to each patch token, mean over heads
SIGNIFICANCE = "significance"  # B x N: attention each patch token receives, summed over heads and queries
KEYS = "keys"  # B x N x D: the block's keys, mean over heads (ToMe's similarity features)
# (ops-merge: MCTF's informativeness) B x (P+N): attention each token, prefix included, receives, mean over heads and queries
RECEIVED = "received"
FEATURES = (CLS_ATTN, SIGNIFICANCE, KEYS, RECEIVED)


@dataclass
class ReduceContext:
    """What a block hands to an operator besides the tokens."""

    sizes: torch.Tensor  # B x N float32: how many original patches each token stands for
    cls_attn: Optional[torch.Tensor] = None
    significance: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None  # (rows, cols) while the tokens still form a 2D grid
    # Seed for operators that draw random numbers, distinct per block (patch's --seed mixed with the
    # block index); draw with ops.common.hash_uniform, a pure function: no generator state to trace.
    seed: int = 0
    track: bool = False  # compute Reduction.assignment (for source maps); off in evaluation
    received: Optional[torch.Tensor] = None  # (ops-merge) B x (P+N), see RECEIVED
    # (ops-merge) where the block sits, for operators whose rule changes with depth (PiToMe's margin, ToFu's
    # prune-then-merge split) or whose reference splits the whole sequence (ToFu, MCTF): plain ints, baked into graphs.
    layer: int = 0  # index of the reducing block
    depth: int = 0  # blocks in the model (0 = unknown)
    num_prefix: int = 0  # prefix tokens (class, distillation, registers) in front of the patch tokens


@dataclass
class Reduction:
    """An operator's output."""

    tokens: torch.Tensor  # B x K x C
    sizes: torch.Tensor  # B x K float32
    # B x N long: output index each input token went into, -1 where it was dropped. Only when ctx.track.
    assignment: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None  # set when the output still forms a grid


@dataclass(frozen=True)
class TokenOperator:
    """Base class: subclasses set ``name``, ``summary`` and implement ``reduce``."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    # True when output tokens stand for groups of inputs (sizes sum to N); False for pruning.
    merges: ClassVar[bool] = False
    # True when the output depends on the patch's seed (random selection); results key on it then.
    draws_random: ClassVar[bool] = False
    # Proportional attention when the user leaves it open (PatchConfig.prop_attn None): the reference's setting.
    default_prop_attn: ClassVar[bool] = False

    def needs(self) -> frozenset[str]:
        """The block features (see FEATURES) this operator reads from the context."""
        return frozenset()

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        """The token count this operator will actually output for a target of k out of n."""
        return max(1, min(k, n))

    def output_grid(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
        """The 2D grid the k output tokens form, if they still form one (only grid pooling does)."""
        return None

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        raise NotImplementedError

    def options(self) -> dict[str, object]:
        """This operator's option values, for result rows."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def label(self) -> str:
        """Name plus non-default options, e.g. 'topk(score=received)'."""
        defaults = type(self)()
        changed = [f"{k}={v}" for k, v in self.options().items() if getattr(defaults, k) != v]
        return self.name + (f"({','.join(changed)})" if changed else "")
