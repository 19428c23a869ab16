"""The operator interface: what every token-reduction method takes and returns.

An operator sees the *patch* tokens of one block (prefix tokens are split off by the patch
mechanism and never reach it), the target count K, and a :class:`ReduceContext` with whatever
the block computed for it (the features it asked for by name, the sizes of the tokens). It
returns a :class:`Reduction`: K tokens, their sizes and, always, the assignment of every input
token to an output token, so that any per-token side tensor (sizes, source map, rope positions)
can follow the tokens through the same reduction (as ToMe's ``merge_source`` replays a matching).

The template: callers call the operator, ``op(x, k, ctx)``; :meth:`TokenOperator.__call__` owns
what every operator shares (the k >= n identity, the autocast policy, the check that an
assignment came back) and calls the subclass's :meth:`TokenOperator.reduce` only with
1 <= k < n. Operators are frozen dataclasses whose fields are their options; their tensor work
lives in pure functions next to them. No hidden state, no Python loop over images.

Block features are registered here by name (:func:`register_feature`): a pure function of the
block's attention (:class:`AttentionView`) computed once by the block, only in blocks that reduce
and only when the block's operator lists the name in ``needs()``. Adding a feature is one
``register_feature`` call.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Literal, Optional

import torch


@dataclass(frozen=True)
class AttentionView:
    """What a block's attention exposes to feature functions (heads kept apart: B x H x N x D)."""

    q: torch.Tensor  # after q-norm and rope, before the scale
    k: torch.Tensor
    v: Optional[torch.Tensor]  # None in a reduce-before-attention block (its values come after the reduction)
    scale: float
    bias: Optional[torch.Tensor]  # additive logit bias, B x 1 x 1 x N (proportional attention), or None
    num_prefix: int
    weights: Optional[torch.Tensor] = None  # softmax attention B x H x N x N, when the block formed it


@dataclass(frozen=True)
class Feature:
    """A named per-block quantity an operator can ask for."""

    name: str
    compute: Callable[[AttentionView], torch.Tensor]
    needs_weights: bool = False  # True: the block must form the explicit N x N attention (no fused kernel)
    doc: str = ""


FEATURE_REGISTRY: dict[str, Feature] = {}


def register_feature(
    name: str, compute: Callable[[AttentionView], torch.Tensor], *, needs_weights: bool = False, doc: str = ""
) -> str:
    """Make feature ``name`` available to every operator (``needs()`` -> ``ctx.feature(name)``); returns the name."""
    FEATURE_REGISTRY[name] = Feature(name, compute, needs_weights, doc)
    return name


def _cls_attn(view: AttentionView) -> torch.Tensor:
    """Class-token row of the attention, mean over heads; without the full matrix, one 1 x N matmul per head."""
    p = view.num_prefix
    if view.weights is not None:
        return view.weights[:, :, 0, p:].float().mean(dim=1)
    scores = (view.q[:, :, :1] * view.scale) @ view.k.transpose(-2, -1)
    if view.bias is not None:
        scores = scores + view.bias
    return scores.float().softmax(dim=-1)[:, :, 0, p:].mean(dim=1)


def _significance(view: AttentionView) -> torch.Tensor:
    assert view.weights is not None
    return view.weights[..., view.num_prefix :].float().sum(dim=(1, 2))


def _received(view: AttentionView) -> torch.Tensor:
    assert view.weights is not None
    return view.weights.float().mean(dim=(1, 2))


def _keys(view: AttentionView) -> torch.Tensor:
    return view.k[:, :, view.num_prefix :].mean(dim=1)


# Features a block can compute for an operator, only when the operator asks for them:
CLS_ATTN = register_feature("cls_attn", _cls_attn, doc="B x N: attention the class token pays to each patch token, mean over heads")
SIGNIFICANCE = register_feature(
    "significance", _significance, needs_weights=True, doc="B x N: attention each patch token receives, summed over heads and queries"
)
KEYS = register_feature("keys", _keys, doc="B x N x D: the block's keys, mean over heads (ToMe's similarity features)")
RECEIVED = register_feature(
    "received", _received, needs_weights=True,
    doc="B x (P+N): attention each token, prefix included, receives, mean over heads and queries (MCTF's informativeness)",
)
FEATURES = tuple(FEATURE_REGISTRY)  # the built-in ones; FEATURE_REGISTRY holds every registered feature


@dataclass
class ReduceContext:
    """What a block hands to an operator besides the tokens.

    Features come by name in ``features`` (read with :meth:`feature`); the built-in ones are also
    fields (``ctx.keys``...), and either way of giving them fills both.
    """

    sizes: torch.Tensor  # B x N float32: how many original patches each token stands for
    cls_attn: Optional[torch.Tensor] = None
    significance: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None  # (rows, cols) while the tokens still form a 2D grid
    # Seed for operators that draw random numbers, distinct per block (patch's --seed mixed with the
    # block index); draw with ops.common.hash_uniform, a pure function: no generator state to trace.
    seed: int = 0
    track: bool = False  # ignored (kept so old callers still build contexts): the assignment is always returned
    num_prefix: int = 0  # prefix tokens (class, distillation, registers) in front of x in the block: ToMe's split parity
    received: Optional[torch.Tensor] = None  # B x (P+N), see RECEIVED
    # where the block sits, for operators whose rule changes with depth (PiToMe's margin, ToFu's
    # prune-then-merge split): plain ints, baked into graphs.
    layer: int = 0  # index of the reducing block
    depth: int = 0  # blocks in the model (0 = unknown)
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in FEATURES:
            given = getattr(self, name)
            if given is not None:
                self.features.setdefault(name, given)
            elif name in self.features:
                setattr(self, name, self.features[name])

    def feature(self, name: str) -> torch.Tensor:
        """Feature ``name``; an operator that reads one it did not list in ``needs()`` fails here, by name."""
        try:
            return self.features[name]
        except KeyError:
            raise KeyError(f"feature {name!r} was not computed: list it in the operator's needs()") from None


@dataclass
class Reduction:
    """An operator's output."""

    tokens: torch.Tensor  # B x K x C
    sizes: torch.Tensor  # B x K float32
    # B x N long: output index each input token went into, -1 where it was dropped. Always returned.
    assignment: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None  # set when the output still forms a grid
    # B x K long, optional: the input token each output token stands in for (ToMe's destination, a
    # medoid, a kept token). Side tensors that follow a representative (rope positions) use it; None
    # means an output is the size-weighted mean of its members.
    representative: Optional[torch.Tensor] = None
    # B x N float32, optional: the weights each output token's mean gives its members when they are
    # not the sizes (MCTF's attention x size). A reduce-before-attention block pools the attention
    # rows with them (see ops/common.pool_attention); None means the sizes.
    weights: Optional[torch.Tensor] = None


def identity_reduction(x: torch.Tensor, ctx: ReduceContext) -> Reduction:
    """Nothing reduced: the tokens, their sizes, the identity assignment, the grid unchanged."""
    b, n = x.shape[:2]
    index = torch.arange(n, device=x.device).expand(b, n)
    return Reduction(x, ctx.sizes, index, grid=ctx.grid, representative=index)


@dataclass(frozen=True)
class TokenOperator:
    """Base class: subclasses set ``name``, ``summary`` and implement ``reduce``; callers call the operator."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    # True when output tokens stand for groups of inputs (sizes sum to N); False for pruning.
    merges: ClassVar[bool] = False
    # True when the output depends on the patch's seed (random selection); results key on it then.
    draws_random: ClassVar[bool] = False
    # Proportional attention when the user leaves it open (PatchConfig.prop_attn None): the reference's setting.
    default_prop_attn: ClassVar[bool] = False
    # False: reduce runs with autocast disabled (float32 distances; see ops/clustering.py).
    autocast: ClassVar[bool] = True

    def needs(self) -> frozenset[str]:
        """The block features (names in FEATURE_REGISTRY) this operator reads from the context."""
        return frozenset()

    def reduces_before_attention(self) -> bool:
        """True: the block reduces its *input* tokens ahead of its attention, with the features of
        that block's attention on the unreduced tokens, and reuses that attention, pooled by the
        reduction's assignment, for the reduced tokens (MCTF's one-step-ahead attention; see
        ``ReducingBlock`` in patch.py). False (the default): reduce between attention and MLP."""
        return False

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        """The token count this operator will actually output for a target of k out of n."""
        return max(1, min(k, n))

    def keep_target(self, n: int, keep: float, target: int) -> int:
        """Patch tokens to aim for at a ``--keep`` layer with n tokens in; ``target`` is tpool's
        compounded floor(N0 * keep**stage). Operators whose reference counts otherwise override it (EViT)."""
        return target

    def output_grid(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
        """The 2D grid the k output tokens form, if they still form one (only grid pooling does)."""
        return None

    def __call__(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        """Reduce the B x N x C patch tokens x to (at most) k; k >= n is the identity (shapes only: static)."""
        if k >= x.shape[1]:
            return identity_reduction(x, ctx)
        policy = nullcontext() if self.autocast else torch.autocast(device_type=x.device.type, enabled=False)
        with policy:
            out = self.reduce(x, k, ctx)
        assert out.assignment is not None, f"{self.name} did not return an assignment"
        return out

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        """The operator's own work, called only with 1 <= k < n; must return the assignment."""
        raise NotImplementedError

    def options(self, complete: bool = False) -> dict[str, object]:
        """This operator's option values, for result rows and keys.

        An option added later (``KEY_WHEN_SET``) is left out at its default, so results stored
        before it existed keep their keys, unless ``complete``: the caller says the option
        matters to the result (``position`` in a rope model, whose default reading changed).
        """
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if complete or not (f.metadata.get("key_when_set") and getattr(self, f.name) == f.default)
        }

    def label(self) -> str:
        """Name plus non-default options, e.g. 'topk(score=received)'."""
        defaults = type(self)()
        changed = [f"{k}={v}" for k, v in self.options().items() if getattr(defaults, k) != v]
        return self.name + (f"({','.join(changed)})" if changed else "")


# metadata of an option added after results existed: left out of result rows and keys at its default
KEY_WHEN_SET = {"key_when_set": True}


@dataclass(frozen=True)
class MeanPosition:
    """The ``position`` option of operators whose merged token sits at its members' mean position.

    It only matters in rope models (the Eva family), where every token carries a position:
    "mean" (default) evaluates the rotary embedding at the size-weighted mean of the members'
    positions; "nearest" uses the rope of the member nearest to that mean (a real patch position,
    the reading before rope was evaluated between patches). Tokens of one keep their own either way.
    """

    position: Literal["mean", "nearest"] = field(default="mean", metadata=KEY_WHEN_SET)
