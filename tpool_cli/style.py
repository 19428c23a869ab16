"""One colour and one marker per operator, the same in every plot of every sweep.

Matplotlib's default colour cycle gives the first operator *of a plot* the first colour, so
kmeans was red in one sweep and green in the next. Here the colour follows the operator's place
in the registry (:data:`OPERATOR_ORDER`, the order of ``tpool_cli.ops._OPERATORS``; a test
keeps the two equal), so a sweep of any subset of operators draws each in its usual colour. An
operator registered later and not yet listed gets a colour from a stable hash of its name.
Variants of one operator in one plot (other options, e.g. ``kmeans(iters=3)``) share its colour
and marker and differ by line style. No matplotlib import: plots ask for the values.
"""

from __future__ import annotations

import hashlib
import re

# ops._OPERATORS order, "none" excluded (kept equal by tests/test_report.py)
OPERATOR_ORDER = (
    "topk", "random", "grid", "kmeans", "kmedoids", "wkmeans", "wkmedoids", "tome", "evit",
    "atc", "dpcknn", "pitome", "tofu", "mctf", "drop",
)
# tab10 without grey (the frontier's colour) and black (the baseline's), then eight more from
# tab20b; more colours than listed operators, so an unlisted one still gets a slot of its own
COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#e7ba52", "#ad494a",
)
# filled markers but the baseline's star; the 15th operator repeats the first marker in its own colour
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "d", "8", "H")
LINESTYLES = ("-", "--", ":", "-.")
FINETUNED_SUFFIX = r" \+ft \d+ ep$"  # the report's label of a fine-tuned point's operator: 'kmeans +ft 3 ep'


def finetuned_label(label: str, epochs: int) -> str:
    """The operator label of a point fine-tuned for ``epochs`` (tpool pareto --finetune-epochs)."""
    return f"{label} +ft {epochs} ep"


def is_finetuned_label(label: str) -> bool:
    return re.search(FINETUNED_SUFFIX, str(label)) is not None


def op_name(label: str) -> str:
    """The registry name of an operator label: 'kmeans(iters=3)' -> 'kmeans', 'kmeans +ft 3 ep' -> 'kmeans'."""
    return re.sub(r"\(.*\)$", "", re.sub(FINETUNED_SUFFIX, "", str(label)))


def _slot(name: str) -> int:
    if name in OPERATOR_ORDER:
        return OPERATOR_ORDER.index(name)
    digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
    return len(OPERATOR_ORDER) + digest % (len(COLOURS) - len(OPERATOR_ORDER))


def op_style(label: str) -> dict[str, str]:
    """{'color', 'marker'} of an operator label (options ignored)."""
    slot = _slot(op_name(label))
    return {"color": COLOURS[slot % len(COLOURS)], "marker": MARKERS[slot % len(MARKERS)]}


def variant_linestyle(index: int) -> str:
    """Line style of the index-th variant of one operator in a plot (0: solid)."""
    return LINESTYLES[index % len(LINESTYLES)]
