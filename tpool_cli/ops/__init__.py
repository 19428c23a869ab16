"""Token-reduction operators and their name registry.

Add an operator by writing a frozen dataclass subclass of :class:`TokenOperator` (its fields are
its options) and listing it in ``_OPERATORS``; the CLI, the patch, FLOP counting and the sweeps
pick it up by name.
"""

from __future__ import annotations

from dataclasses import fields
import types
from typing import Any, Literal, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

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


def option_types(name: str) -> dict[str, Any]:
    """{option: declared type} of operator ``name``: its dataclass fields, in declaration order."""
    cls = get_operator_class(name)
    hints = get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in fields(cls)}


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_option(name: str, key: str, value: Any, kind: Any) -> Any:
    """``value`` as option ``key`` of operator ``name`` (declared ``kind``): text parsed by the type, choices checked.

    Text comes from the command line (``--op-opt iters=3``); other values are taken as they are,
    a ``Literal`` option still checked against its choices.
    """
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType) and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise TpoolError(f"{name}: {key} must be one of {', '.join(map(str, args))}, got {value!r}")
    if not isinstance(value, str) or kind in (str, Any):
        return value
    try:
        if kind is bool:
            if value.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(value)
            return value.strip().lower() in _TRUE
        return kind(value)
    except (TypeError, ValueError):
        raise TpoolError(f"{name}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}") from None


def make_operator(name: str, **options: Any) -> TokenOperator:
    """Build operator ``name`` with the given options; ``None`` means the option's default.

    An option the operator does not have is an error naming the ones it has (for one set of
    options over several operators, each taking the ones it has, see :func:`make_operators`).
    Text values are parsed by the option's declared type; choices are checked.
    """
    kinds = option_types(name)
    unknown = [key for key in options if key not in kinds]
    if unknown:
        valid = ", ".join(kinds) if kinds else "none"
        raise TpoolError(f"operator {name} has no option {unknown[0]!r} (its options: {valid})")
    kwargs = {key: parse_option(name, key, value, kinds[key]) for key, value in options.items() if value is not None}
    return get_operator_class(name)(**kwargs)


def make_operators(names: Sequence[str], options: Optional[Mapping[str, Any]] = None) -> list[TokenOperator]:
    """One operator per name, each given the options it has: one set of options over several operators.

    Every option must belong to at least one of the operators; otherwise one error naming the
    options they have. ``None`` values mean the default.
    """
    options = dict(options or {})
    kinds = {name: option_types(name) for name in names}
    known = [key for name in names for key in kinds[name]]
    unknown = [key for key, value in options.items() if value is not None and key not in known]
    if unknown:
        valid = ", ".join(dict.fromkeys(known)) or "none"
        which = names[0] if len(names) == 1 else ", ".join(names)
        raise TpoolError(f"no operator of {which} has an option {unknown[0]!r} (their options: {valid})")
    return [make_operator(name, **{k: v for k, v in options.items() if k in kinds[name]}) for name in names]


__all__ = [
    "FEATURES",
    "ReduceContext",
    "Reduction",
    "TokenOperator",
    "make_operator",
    "make_operators",
    "option_types",
    "parse_option",
    "operator_names",
    "register",
]
