"""`tpool ops`: the registered operators and their options (what --op and --op-opt accept)."""

from __future__ import annotations

import typing

from ..cli_options import FormatOpt
from ..output import check_format, emit, make_table


def _type_name(kind: object) -> str:
    """'int', 'cls|received', 'int|None' ...: the option's type as --op-opt parses it."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if args:
        return "|".join(_type_name(a) for a in args)
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))


def ops(fmt: FormatOpt = "table") -> None:
    """List the operators (registry order) with their options, types and defaults (set with --op-opt KEY=VALUE)."""
    from dataclasses import MISSING, fields

    from ..ops import get_operator_class, operator_names, option_types

    check_format(fmt)
    rows = []
    for name in operator_names():
        cls = get_operator_class(name)
        defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        options = {key: {"type": _type_name(kind), "default": defaults.get(key)} for key, kind in option_types(name).items()}
        rows.append({"op": name, "options": options, "about": cls.summary})  # its one line (a docstring may be dataclass's signature)
    lines = [
        (r["op"], ", ".join(f"{k}={v['default']} ({v['type']})" for k, v in r["options"].items()) or "-", r["about"])
        for r in rows
    ]
    table = make_table("operators: --op NAME, options: --op-opt KEY=VALUE", ["op", "options (default, type)", "what it does"], lines)
    emit({"operators": rows}, rows, fmt, None, [table])
