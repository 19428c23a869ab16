"""The one mechanism that puts a token-reduction operator into a timm Vision Transformer.

Every block of ``model.blocks`` is wrapped in a :class:`ReducingBlock`. A wrapped block runs
its family's attention through the family's adapter (``tpool_cli/adapters``: q/k/v with their
biases and q/k-norm, the attention branch, LayerScale) and the shared :func:`attend` (fused
attention kept where the operator's features allow), then, if the schedule says so, hands the patch tokens
to the operator between the attention and the MLP (as ToMe and EViT do), so the MLP already runs
on fewer tokens. An operator whose ``reduces_before_attention()`` is true (MCTF's one-step-ahead
attention) is handed the block's input instead, with the features of that block's attention on
the unreduced tokens; the attention, pooled by the same reduction, is then applied to the reduced
tokens' values, so it is not recomputed (:meth:`ReducingBlock._forward_ahead`). Prefix tokens
(class, distillation, registers) are split off before the operator and put back in front unchanged.

Until the first reduction, a wrapped block calls the original timm block untouched, so keep rate
1.0 is bit-identical to the unpatched model. Per-forward state (token sizes, the 2D grid, the
source map) lives in one :class:`ReductionState` shared by the blocks and reset by block 0. Every
per-token side tensor follows the tokens through the same reduction, by the assignment every
operator returns (sizes from the operator itself, the source map by :func:`follow_source`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from .adapters import BlockAdapter, adapter_for
from .adapters.heads import install_sized_pool, remove_sized_pool
from .adapters.rope import affine_rope_problem, gather_rope, rope_at_positions
from .attention import apply_weights, attend, attend_ahead
from .errors import TpoolError
from .ops import TokenOperator, make_operator
from .ops.base import CLS_ATTN, SIGNIFICANCE, ReduceContext, Reduction
from .ops.common import follow_source, hash32, nearest_member, pool_attention, replay_mean, replay_take
from .patch_config import PatchConfig
from .recon import reconstruction_error
from .schedule import Schedule

log = logging.getLogger(__name__)


@dataclass
class ReductionState:
    """What flows between the blocks of one forward pass besides the tokens."""

    num_prefix: int
    initial_grid: Optional[tuple[int, int]]
    prop_attn: Optional[bool] = None
    track: bool = False  # keep a source map (which original patch each token stands for)
    diagnose: bool = False  # record the reconstruction error of every reduction (see recon.py)
    seed: int = 0
    depth: int = 0  # blocks in the model, for operators whose rule depends on the block (ReduceContext.depth)
    n0: int = 0
    sizes: Optional[torch.Tensor] = None  # B x N float32, None until the first reduction
    grid: Optional[tuple[int, int]] = None
    source: Optional[torch.Tensor] = None  # B x N0 long: current token of each original patch, -1 = dropped
    counts: dict[int, tuple[int, int]] = field(default_factory=dict)  # block -> (patch tokens in, out)
    history: list[torch.Tensor] = field(default_factory=list)  # source map after each reduction (track only)
    diagnostics: list[dict] = field(default_factory=list)  # per reduction: layer, tokens, errors (diagnose only)
    # rope families only (an adapter with uses_rope): per-token position side tensors
    uses_rope: bool = False
    positions: Optional[torch.Tensor] = None  # B x N x 2 float32 (row, col) in patch units, None = the grid
    rope_index: Optional[torch.Tensor] = None  # B x N long: original patch whose rope rows a token uses
    rope_between: bool = False  # the model's rope can be evaluated between patches (adapters/rope.py)
    # a reduce-before-attention block's attention pooled by its reduction (Reducer -> that block, read once)
    pooled_attention: Optional[torch.Tensor] = None

    def begin(self, x: torch.Tensor) -> None:
        """Reset at the start of a forward pass (called by block 0)."""
        self.n0 = int(x.shape[1]) - self.num_prefix
        self.sizes = None
        self.source = None
        self.positions = None
        self.rope_index = None
        self.grid = self.initial_grid if self.grid_known else None
        self.counts = {}
        self.history = []
        self.diagnostics = []

    def follow(self, out: Reduction, sizes: torch.Tensor, position: Optional[str] = None) -> None:
        """Replay one reduction on the side tensors: the source map (under ``track``), rope positions.

        ``sizes`` are the input tokens' sizes (the weights of a mean position); ``position`` is the
        operator's ``position`` option (None: the operator has none), see :func:`follow_positions`.
        """
        if self.track:
            self.source = follow_source(self.source, out.assignment)
            self.history.append(self.source)
        if self.uses_rope:
            if self.positions is None:  # the first reduction: every token at its own patch
                positions = initial_positions(self, sizes)
                index: Optional[torch.Tensor] = torch.arange(sizes.shape[1], device=sizes.device).expand_as(sizes)
            else:
                positions, index = self.positions, self.rope_index
            rule = position_rule(out, position, exact=self.rope_between and self.grid_known)
            self.positions, self.rope_index = follow_positions(positions, index, sizes, out, out.tokens.shape[1], rule)

    @property
    def fractional(self) -> bool:
        """Some position is a mean evaluated as such: positions exist but no rope rows follow them."""
        return self.positions is not None and self.rope_index is None

    @property
    def grid_known(self) -> bool:
        """The unreduced grid is the model's (rope between patches needs its rows and columns)."""
        return self.initial_grid is not None and self.n0 == self.initial_grid[0] * self.initial_grid[1]

    def token_rope(self, rope: torch.Tensor) -> torch.Tensor:
        """The rope of the current tokens from the block's full-grid table (see adapters/rope.py)."""
        if self.fractional:
            return rope_at_positions(rope, self.positions, self.initial_grid)
        return gather_rope(rope, self.rope_index)

    def block_seed(self, index: int) -> int:
        """The seed random operators use at block ``index``: a plain int, so compiled graphs bake it in."""
        return hash32(self.seed ^ hash32(index + 0x9E3779B9))


def initial_positions(state: ReductionState, sizes: torch.Tensor) -> torch.Tensor:
    """(row, col) of every patch token of the unreduced grid (a 1 x N row when the grid is unknown), B x N x 2."""
    b, n = sizes.shape
    i = torch.arange(n, device=sizes.device)
    cols = state.initial_grid[1] if state.initial_grid else n
    return torch.stack([torch.div(i, cols, rounding_mode="floor"), i % cols], dim=-1).float().expand(b, n, 2)


def position_rule(out: Reduction, position: Optional[str], exact: bool) -> str:
    """How output positions follow a reduction: "representative", "mean" or "nearest".

    An operator's ``position`` option decides where it has one ("destination" = its
    representative, ToMe's reading); otherwise a reduction that names a representative per output
    (pruning, K-Medoids, ToMe) uses it and any other takes the size-weighted mean. A mean is
    evaluated exactly only when the model's rope allows it (``exact``); else the nearest member's.
    """
    if out.representative is not None and position in (None, "destination"):
        return "representative"
    return "mean" if exact and position != "nearest" else "nearest"


def follow_positions(
    positions: torch.Tensor, index: Optional[torch.Tensor], sizes: torch.Tensor, out: Reduction, k: int, rule: str = "nearest"
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Positions and rope indices after a reduction, by :func:`position_rule`'s ``rule``.

    "representative": each output takes its representative's position and rope row. Otherwise a
    merged token's position is the size-weighted mean of its members' positions; "nearest" gives
    it the rope row of the member nearest to that mean (ties: the lowest index), "mean" the rope
    evaluated at the mean itself (no index: the rope follows the positions from now on).
    ``index`` is None once positions are fractional (an earlier "mean").
    """
    if rule == "representative":
        taken = None if index is None else index.gather(1, out.representative)
        return replay_take(positions, out.representative), taken
    mean = replay_mean(positions, sizes, out.assignment, k)
    if rule == "mean" or index is None:
        return mean, None
    return mean, index.gather(1, nearest_member(positions, out.assignment, mean))


class Reducer(nn.Module):
    """Applies the operator to the patch tokens. A module of its own so FLOP counts name it."""

    def __init__(self, operator: TokenOperator, state: ReductionState, index: int) -> None:
        super().__init__()
        self.operator = operator
        self.state = state
        self.index = index

    def forward(
        self, x: torch.Tensor, k: int, features: dict[str, torch.Tensor], attention: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The tokens after the operator. With ``attention`` (B x H x T x T, a reduce-before-attention
        block's), that attention pooled by the same reduction (:func:`pool_attention`, operator work,
        so counted here) is left in ``state.pooled_attention`` for the block."""
        st = self.state
        p = st.num_prefix
        prefix, patches = x[:, :p], x[:, p:]
        b, n = patches.shape[:2]
        sizes = st.sizes if st.sizes is not None else torch.ones(b, n, device=x.device, dtype=torch.float32)
        ctx = ReduceContext(
            sizes=sizes,
            grid=st.grid,
            seed=st.block_seed(self.index),
            features=features,
            layer=self.index,
            depth=st.depth,
            num_prefix=p,
        )
        out = self.operator(patches, k, ctx)
        st.sizes, st.grid = out.sizes, out.grid
        st.follow(out, sizes, getattr(self.operator, "position", None))
        if st.diagnose:
            st.diagnostics.append(
                {
                    "layer": self.index,
                    "tokens_in": n,
                    "tokens_out": k,
                    "recon": reconstruction_error(patches, out.tokens, sizes),
                    "recon_weighted": reconstruction_error(patches, out.tokens, sizes, features[SIGNIFICANCE]),
                }
            )
        if attention is not None:
            weights = out.weights if out.weights is not None else sizes
            st.pooled_attention = pool_attention(attention, out.assignment, weights, out.tokens.shape[1], p)
        return torch.cat([prefix, out.tokens], dim=1)


class ReducingBlock(nn.Module):
    """A block of any supported family with an operator between its attention and its MLP (or, for an
    operator that ``reduces_before_attention``, ahead of its attention, which it then reuses).

    Generic: what differs between families (q/k/v, the attention branch, the residuals) comes from
    ``adapter`` (chosen by the block's exact class, ``tpool_cli/adapters``).
    """

    def __init__(
        self, block: nn.Module, index: int, target: Optional[int], reducer: Reducer, adapter: Optional[BlockAdapter] = None,
        remove: Optional[int] = None, keep: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.target = target  # patch tokens wanted after this block, None = this block never reduces
        self.reducer = reducer
        self.adapter = adapter if adapter is not None else adapter_for(block, index)
        self.remove = remove  # r schedules: tokens to remove from this block's input (target = n - r)
        self.keep = keep  # keep schedules: the rate, for operators that count from it (TokenOperator.keep_target)

    @property
    def state(self) -> ReductionState:
        return self.reducer.state

    def planned_tokens(self, n: int) -> int:
        """Patch tokens this block outputs for n input patch tokens (static: shapes only)."""
        target = self.target
        if self.remove is not None:
            target = n - self.remove
        elif self.keep is not None and target is not None:
            target = self.reducer.operator.keep_target(n, self.keep, target)
        if target is None or target >= n:
            return n
        return self.reducer.operator.realise(n, target, self.state.grid)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, **kwargs: object
    ) -> torch.Tensor:
        st = self.state
        if self.index == 0:
            st.begin(x)
        n = int(x.shape[1]) - st.num_prefix
        k = self.planned_tokens(n)
        st.counts[self.index] = (n, k)
        if k == n and st.sizes is None:  # nothing reduced yet: the family's own block
            return self.adapter.run_original(self.block, x, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
        if attn_mask is not None or is_causal:
            raise TpoolError("token reduction cannot be combined with an attention mask or causal attention")
        blk, ad = self.block, self.adapter
        h = ad.norm1(blk, x)
        rope = kwargs.get("rope")
        if rope is not None:
            rope = st.token_rope(rope)
        if k < n and self.reducer.operator.reduces_before_attention():
            return self._forward_ahead(x, h, k, rope)
        q, key, v = ad.qkv(blk, h, rope, st.num_prefix)
        out, features = attend(q, key, v, ad.spec(blk), self._bias(x), self._needs(k < n), st.num_prefix)
        x = ad.attn_residual(blk, x, ad.attention_output(blk, out, h))
        if k < n:
            x = self.reducer(x, k, features)
        return ad.mlp_residual(blk, x)

    def _forward_ahead(self, x: torch.Tensor, h: torch.Tensor, k: int, rope: Optional[torch.Tensor]) -> torch.Tensor:
        """Reduce before the attention (an operator with ``reduces_before_attention``, MCTF's one-step-ahead).

        The attention weights of the unreduced tokens (q and k only, proportional bias of the
        current sizes) give the operator its features; the operator reduces the block's *input*
        tokens; those weights, pooled by the same reduction, are applied to the values of the
        reduced tokens (formed from them: v of the unreduced tokens is never computed), then the
        attention residual and the MLP run on the reduced tokens, as the reference's block does.
        """
        blk, ad, st = self.block, self.adapter, self.state
        spec = ad.spec(blk)
        q, key = ad.qk(blk, h, rope, st.num_prefix)
        weights, features = attend_ahead(q, key, spec, self._bias(x), self._needs(True), st.num_prefix)
        x = self.reducer(x, k, features, weights)
        pooled, st.pooled_attention = st.pooled_attention, None
        h = ad.norm1(blk, x)
        out = apply_weights(pooled, ad.values(blk, h), spec)
        x = ad.attn_residual(blk, x, ad.attention_output(blk, out, h))
        return ad.mlp_residual(blk, x)

    def _bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Proportional attention's log(size) logit bias (B x 1 x 1 x N; 0 for prefix tokens), or None."""
        st = self.state
        if not st.prop_attn or st.sizes is None:
            return None
        ones = torch.zeros(x.shape[0], st.num_prefix, device=x.device)
        return torch.cat([ones, st.sizes.log()], dim=1)[:, None, None, :]

    def _needs(self, reduces: bool) -> frozenset[str]:
        """Features to compute in this block: the operator's, plus significance for diagnostics; none if it keeps all."""
        if not reduces:
            return frozenset()
        needs = self.reducer.operator.needs()
        return needs | {SIGNIFICANCE} if self.state.diagnose else needs


# model classes known not to fit the one mechanism, and why (matched by class name: no import of their modules)
UNSUPPORTED_FAMILIES = {
    "SwinTransformer": "Swin uses windowed attention over a fixed token grid",
    "SwinTransformerV2": "Swin V2 uses windowed attention over a fixed token grid",
    "SwinTransformerV2Cr": "Swin V2 uses windowed attention over a fixed token grid",
    "Hiera": "Hiera uses windowed (mask-unit) attention and pools its token grid itself",
    "NaFlexVit": "NaFlex ViTs run variable-resolution patch sequences with padding masks",
}


def check_supported(model: nn.Module) -> None:
    """One clear error for models the patch cannot handle (no block list, or a block family without an adapter)."""
    family = type(model).__name__
    if family in UNSUPPORTED_FAMILIES:
        raise TpoolError(f"{family} is not supported: {UNSUPPORTED_FAMILIES[family]}; tpool patches ViT/DeiT/Eva-style models")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not hasattr(model, "num_prefix_tokens"):
        raise TpoolError(f"{type(model).__name__} is not a timm VisionTransformer: tpool patches ViT/DeiT-style models")
    for i, blk in enumerate(blocks):
        adapter_for(blk.block if isinstance(blk, ReducingBlock) else blk, i)


def is_patched(model: nn.Module) -> bool:
    return any(isinstance(b, ReducingBlock) for b in getattr(model, "blocks", []))


def patch(
    model: nn.Module,
    op: str | TokenOperator = "topk",
    keep: Optional[float] = None,
    layers: Optional[tuple[int, ...]] = None,
    tokens: Optional[tuple[int, ...]] = None,
    *,
    r: Optional[int | tuple[int, ...]] = None,
    schedule: Optional[Schedule] = None,
    config: Optional[PatchConfig] = None,
    prop_attn: Optional[bool] = None,
    track: Optional[bool] = None,
    diagnose: Optional[bool] = None,
    seed: Optional[int] = None,
    **op_options: object,
) -> nn.Module:
    """Insert operator ``op`` into ``model`` in place (re-patching replaces an earlier patch).

    Args:
        op: an operator name (built with ``op_options``) or a ready :class:`TokenOperator`.
        keep, layers, tokens, r, schedule: the schedule, as ``keep`` (+ ``layers``), ``tokens``
            (+ ``layers``), ``r`` (tokens removed in every block, or one value per block: ToMe's r)
            or a ready :class:`Schedule`.
        config: the patch-wide settings (:class:`PatchConfig`: proportional attention, seed,
            track, diagnose); ``prop_attn=None`` there means the operator's ``default_prop_attn``.
        prop_attn, track, diagnose, seed: loose overrides of ``config``'s fields, kept for old
            callers. ``prop_attn`` adds log(size) to attention logits after the first reduction
            (ToMe's proportional attention); ``track`` keeps a source map of which original
            patches each token stands for (``model.tpool_state.source``; a gather per reduction);
            ``diagnose`` records the reconstruction error of every reduction in
            ``model.tpool_state.diagnostics`` (costs an explicit attention, changes no output).

    Returns the model, with ``tpool_state``, ``tpool_schedule``, ``tpool_operator`` and
    ``tpool_config`` (the resolved config) set.
    """
    check_supported(model)
    unpatch(model)
    operator = op if isinstance(op, TokenOperator) else make_operator(op, **op_options)
    loose = dict(prop_attn=prop_attn, track=track, diagnose=diagnose, seed=seed)
    config = replace(config or PatchConfig(), **{key: v for key, v in loose.items() if v is not None}).resolve(operator)
    if CLS_ATTN in operator.needs() and getattr(model, "cls_token", None) is None:
        raise TpoolError(f"{operator.name} ranks tokens by class-token attention, and {type(model).__name__} has no class token")
    if schedule is None:
        schedule = Schedule(keep=keep, tokens=tokens, layers=layers, r=r)
    depth = len(model.blocks)
    grid = tuple(model.patch_embed.grid_size) if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "grid_size") else None
    num_patches = grid[0] * grid[1] if grid else model.patch_embed.num_patches
    targets, removals = schedule.targets(depth, num_patches), schedule.removals(depth)
    rate = schedule.keep if schedule.keep is not None and not schedule.is_identity else None
    state = ReductionState(
        num_prefix=model.num_prefix_tokens,
        initial_grid=grid,
        prop_attn=bool(config.prop_attn),
        track=config.track,
        diagnose=config.diagnose,
        seed=config.seed,
        depth=depth,
    )
    for i in range(depth):
        # one Reducer module per block so that FLOP counts attribute operator cost per layer
        model.blocks[i] = ReducingBlock(
            model.blocks[i], i, targets.get(i), Reducer(operator, state, i), remove=removals.get(i), keep=rate
        )
    state.uses_rope = any(blk.adapter.uses_rope for blk in model.blocks) and getattr(model, "rope", None) is not None
    if state.uses_rope and getattr(operator, "position", None) == "mean":  # only a mean position needs it
        problem = affine_rope_problem(model, grid)
        state.rope_between = problem is None
        if problem:
            log.warning("rope between patches is not evaluated for %s: %s; a merged token uses its nearest member's rope", type(model).__name__, problem)
    install_sized_pool(model, state, operator.merges)
    model.tpool_state = state
    model.tpool_schedule = schedule
    model.tpool_operator = operator
    model.tpool_config = config
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original timm blocks (no-op on an unpatched model)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return model
    for i, blk in enumerate(blocks):
        if isinstance(blk, ReducingBlock):
            blocks[i] = blk.block
    remove_sized_pool(model)
    for attr in ("tpool_state", "tpool_schedule", "tpool_operator", "tpool_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def planned_counts(model: nn.Module, num_patches: Optional[int] = None) -> list[tuple[int, int]]:
    """(patch tokens in, out) per block of a patched model, derived from shapes alone."""
    state: ReductionState = model.tpool_state
    n = num_patches if num_patches is not None else state.initial_grid[0] * state.initial_grid[1]  # type: ignore[index]
    saved = state.grid
    state.grid = state.initial_grid
    counts = []
    try:
        for blk in model.blocks:
            k = blk.planned_tokens(n)
            if k < n:
                state.grid = blk.reducer.operator.output_grid(n, k, state.grid)
            counts.append((n, k))
            n = k
    finally:
        state.grid = saved
    return counts


def capped_blocks(model: nn.Module, num_patches: Optional[int] = None) -> list[tuple[int, int, int]]:
    """(block, tokens the schedule asked to remove, tokens the operator removes) where its cap bites.

    For ``r`` schedules: an r above what the operator can remove in a block (ToMe: half the
    tokens) is realised capped, as ToMe does, and reported here rather than refused.
    """
    out = []
    for blk, (n, k) in zip(model.blocks, planned_counts(model, num_patches)):
        if blk.remove is not None and n - k < blk.remove:
            out.append((blk.index, blk.remove, n - k))
    return out
