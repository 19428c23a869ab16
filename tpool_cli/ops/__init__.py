"""Token-reduction operators and their name registry.

Add an operator by writing a frozen dataclass subclass of :class:`TokenOperator` (its fields are
its options) and listing it in ``_OPERATORS``; the CLI, the patch, FLOP counting and the sweeps
pick it up by name.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..errors import TpoolError
from .atc import ATC
from .base import FEATURES, ReduceContext, Reduction, TokenOperator
from .clustering import KMeans, KMedoids, WeightedKMeans, WeightedKMedoids
from .dpcknn import DPCKNN
from .evit import EViT
from .grid import GridPool
from .ideal import DropTokens
from .mctf import MCTF
from .pitome import PiToMe
from .pruning import NoReduction, RandomSelect, TopK
from .tofu import ToFu
from .tome import ToMe

_OPERATORS: dict[str, type[TokenOperator]] = {
    cls.name: cls
    for cls in (NoReduction, TopK, RandomSelect, GridPool, KMeans, KMedoids, WeightedKMeans, WeightedKMedoids, ToMe, EViT)
}


def operator_names() -> list[str]:
    """Registered operator names, in registry order."""
    return list(_OPERATORS)


def register(cls: type[TokenOperator]) -> type[TokenOperator]:
    """Register an operator class under its ``name`` (usable as a decorator)."""
    _OPERATORS[cls.name] = cls
    return cls


register(ATC)
register(DPCKNN)
register(PiToMe)  # ops-merge: PiToMe (hchautran/PiToMe)
register(ToFu)  # ops-merge: Token Fusion (PiToMe's algo/tofu)
register(MCTF)  # ops-merge: Multi-Criteria Token Fusion (mlvlab/MCTF)
register(DropTokens)  # last: a speed reference for `tpool bench`, not a method (see ops/ideal.py)


def get_operator_class(name: str) -> type[TokenOperator]:
    try:
        return _OPERATORS[name]
    except KeyError:
        raise TpoolError(f"unknown operator {name!r}; choose from: {', '.join(_OPERATORS)}") from None


def make_operator(name: str, **options: Any) -> TokenOperator:
    """Build operator ``name`` with the given options; options it does not have are ignored.

    Ignoring lets one set of CLI options (``--iters``, ``--score``...) apply to a list of operators.
    Values are checked against the option's declared choices where it has them.
    """
    cls = get_operator_class(name)
    accepted = {f.name: f for f in fields(cls)}
    kwargs = {key: value for key, value in options.items() if key in accepted and value is not None}
    hints = get_type_hints(cls)
    for key, value in kwargs.items():
        choices = get_args(hints.get(key)) if get_origin(hints.get(key)) is Literal else ()
        if choices and value not in choices:
            raise TpoolError(f"{name}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return cls(**kwargs)


__all__ = [
    "FEATURES",
    "ReduceContext",
    "Reduction",
    "TokenOperator",
    "make_operator",
    "operator_names",
    "register",
]
