"""The one mechanism that puts a token-reduction operator into a timm Vision Transformer.

Every block of ``model.blocks`` is wrapped in a :class:`ReducingBlock`. A wrapped block runs
timm's own attention (through :func:`attention_with_features`, which keeps LayerScale, q/k-norm,
fused attention, the gate and scale-norm), then, if the schedule says so, hands the patch tokens
to the operator between the attention and the MLP (as ToMe and EViT do), so the MLP already runs
on fewer tokens. Prefix tokens (class, distillation, registers) are split off before the operator
and put back in front unchanged.

Until the first reduction, a wrapped block calls the original timm block untouched, so keep rate
1.0 is bit-identical to the unpatched model. Per-forward state (token sizes, the 2D grid, the
source map) lives in one :class:`ReductionState` shared by the blocks and reset by block 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .attention import attention_with_features
from .errors import TpoolError
from .ops import TokenOperator, make_operator
from .ops.base import CLS_ATTN, SIGNIFICANCE, ReduceContext
from .ops.common import hash32
from .recon import reconstruction_error
from .schedule import Schedule


@dataclass
class ReductionState:
    """What flows between the blocks of one forward pass besides the tokens."""

    num_prefix: int
    initial_grid: Optional[tuple[int, int]]
    prop_attn: bool = False
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

    def begin(self, x: torch.Tensor) -> None:
        """Reset at the start of a forward pass (called by block 0)."""
        self.n0 = int(x.shape[1]) - self.num_prefix
        self.sizes = None
        self.source = None
        self.grid = self.initial_grid if self.initial_grid and self.initial_grid[0] * self.initial_grid[1] == self.n0 else None
        self.counts = {}
        self.history = []
        self.diagnostics = []

    def block_seed(self, index: int) -> int:
        """The seed random operators use at block ``index``: a plain int, so compiled graphs bake it in."""
        return hash32(self.seed ^ hash32(index + 0x9E3779B9))


class Reducer(nn.Module):
    """Applies the operator to the patch tokens. A module of its own so FLOP counts name it."""

    def __init__(self, operator: TokenOperator, state: ReductionState, index: int) -> None:
        super().__init__()
        self.operator = operator
        self.state = state
        self.index = index

    def forward(self, x: torch.Tensor, k: int, features: dict[str, torch.Tensor]) -> torch.Tensor:
        st = self.state
        p = st.num_prefix
        prefix, patches = x[:, :p], x[:, p:]
        b, n = patches.shape[:2]
        sizes = st.sizes if st.sizes is not None else torch.ones(b, n, device=x.device, dtype=torch.float32)
        ctx = ReduceContext(
            sizes=sizes,
            grid=st.grid,
            seed=st.block_seed(self.index),
            track=st.track,
            layer=self.index,
            depth=st.depth,
            num_prefix=p,
            **features,
        )
        out = self.operator.reduce(patches, k, ctx)
        st.sizes, st.grid = out.sizes, out.grid
        if st.track:
            assert out.assignment is not None, f"{self.operator.name} did not return an assignment"
            source = st.source if st.source is not None else torch.arange(n, device=x.device).expand(b, n)
            st.source = torch.where(source >= 0, out.assignment.gather(1, source.clamp_min(0)), source)
            st.history.append(st.source)
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
        return torch.cat([prefix, out.tokens], dim=1)


class ReducingBlock(nn.Module):
    """A timm block with an operator between its attention and its MLP."""

    def __init__(self, block: nn.Module, index: int, target: Optional[int], reducer: Reducer) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.target = target  # patch tokens wanted after this block, None = this block never reduces
        self.reducer = reducer

    @property
    def state(self) -> ReductionState:
        return self.reducer.state

    def planned_tokens(self, n: int) -> int:
        """Patch tokens this block outputs for n input patch tokens (static: shapes only)."""
        if self.target is None or self.target >= n:
            return n
        return self.reducer.operator.realise(n, self.target, self.state.grid)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        st = self.state
        if self.index == 0:
            st.begin(x)
        n = int(x.shape[1]) - st.num_prefix
        k = self.planned_tokens(n)
        st.counts[self.index] = (n, k)
        if k == n and st.sizes is None:
            return self.block(x, attn_mask=attn_mask, is_causal=is_causal)  # nothing reduced yet: timm's own block
        if attn_mask is not None or is_causal:
            raise TpoolError("token reduction cannot be combined with an attention mask or causal attention")
        blk = self.block
        bias = None
        if st.prop_attn and st.sizes is not None:
            ones = torch.zeros(x.shape[0], st.num_prefix, device=x.device)
            bias = torch.cat([ones, st.sizes.log()], dim=1)[:, None, None, :]
        needs = self.reducer.operator.needs() if k < n else frozenset()
        if k < n and st.diagnose:
            needs = needs | {SIGNIFICANCE}
        attn_out, features = attention_with_features(blk.attn, blk.norm1(x), bias, needs, st.num_prefix)
        x = x + blk.drop_path1(blk.ls1(attn_out))
        if k < n:
            x = self.reducer(x, k, features)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def check_supported(model: nn.Module) -> None:
    """One clear error for models the patch cannot handle (not a timm ViT with pre-norm blocks)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, nn.Sequential) or not hasattr(model, "num_prefix_tokens"):
        raise TpoolError(f"{type(model).__name__} is not a timm VisionTransformer: tpool patches ViT/DeiT-style models")
    for i, blk in enumerate(blocks):
        blk = blk.block if isinstance(blk, ReducingBlock) else blk
        attn = getattr(blk, "attn", None)
        missing = [a for a in ("norm1", "ls1", "norm2", "mlp", "ls2") if not hasattr(blk, a)]
        missing += [a for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "proj") if not hasattr(attn, a)]
        if missing:
            raise TpoolError(
                f"block {i} ({type(blk).__name__}) is not a timm pre-norm Block with standard Attention "
                f"(missing {', '.join(missing)}); this model family is not supported"
            )


def is_patched(model: nn.Module) -> bool:
    return any(isinstance(b, ReducingBlock) for b in getattr(model, "blocks", []))


def patch(
    model: nn.Module,
    op: str | TokenOperator = "topk",
    keep: Optional[float] = None,
    layers: Optional[tuple[int, ...]] = None,
    tokens: Optional[tuple[int, ...]] = None,
    *,
    schedule: Optional[Schedule] = None,
    prop_attn: bool = False,
    track: bool = False,
    diagnose: bool = False,
    seed: int = 0,
    **op_options: object,
) -> nn.Module:
    """Insert operator ``op`` into ``model`` in place (re-patching replaces an earlier patch).

    Give the schedule as ``keep`` (+ ``layers``), ``tokens`` (+ ``layers``) or a ready
    :class:`Schedule`. ``prop_attn`` adds log(size) to attention logits after the first
    reduction (ToMe's proportional attention); ``track`` keeps a source map of which original
    patches each token stands for (``model.tpool_state.source``), off by default because it costs
    a gather per reduction. ``diagnose`` records the reconstruction error of every reduction in
    ``model.tpool_state.diagnostics`` (it computes the significance scores for the weighted error,
    so it changes nothing the operator sees but costs an explicit attention). Returns the model.
    """
    check_supported(model)
    unpatch(model)
    operator = op if isinstance(op, TokenOperator) else make_operator(op, **op_options)
    if CLS_ATTN in operator.needs() and getattr(model, "cls_token", None) is None:
        raise TpoolError(f"{operator.name} ranks tokens by class-token attention, and {type(model).__name__} has no class token")
    if schedule is None:
        schedule = Schedule(keep=keep, tokens=tokens, layers=layers)
    depth = len(model.blocks)
    grid = tuple(model.patch_embed.grid_size) if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "grid_size") else None
    num_patches = grid[0] * grid[1] if grid else model.patch_embed.num_patches
    targets = schedule.targets(depth, num_patches)
    state = ReductionState(
        num_prefix=model.num_prefix_tokens, initial_grid=grid, prop_attn=prop_attn, track=track, diagnose=diagnose, seed=seed, depth=depth
    )
    for i in range(depth):
        # one Reducer module per block so that FLOP counts attribute operator cost per layer
        model.blocks[i] = ReducingBlock(model.blocks[i], i, targets.get(i), Reducer(operator, state, i))
    model.tpool_state = state
    model.tpool_schedule = schedule
    model.tpool_operator = operator
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original timm blocks (no-op on an unpatched model)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return model
    for i, blk in enumerate(blocks):
        if isinstance(blk, ReducingBlock):
            blocks[i] = blk.block
    for attr in ("tpool_state", "tpool_schedule", "tpool_operator"):
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
