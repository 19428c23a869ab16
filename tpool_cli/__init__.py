"""tpool: token reduction in pretrained timm Vision Transformers.

Importing the package registers the built-in demo model ``tpool_digits_vit`` with timm (see
:mod:`tpool_cli.demo`), so every code path that takes a timm model name accepts it.
"""

from .threads import early_policy as _early_policy

_early_policy()  # before torch is imported: passive OpenMP waiting on shared cores (threads.py)

from . import demo as _demo  # noqa: F401  (registers tpool_digits_vit with timm)
