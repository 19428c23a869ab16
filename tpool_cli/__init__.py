"""tpool: token reduction in pretrained timm Vision Transformers.

Importing the package imports nothing else: neither the CLI (:mod:`tpool_cli.cli`) nor torch, so
``import tpool_cli.ops`` or ``tpool --help`` pay only for what they use. The built-in demo model
``tpool_digits_vit`` is registered with timm by :mod:`tpool_cli.demo`, which
:mod:`tpool_cli.models` (where model names are resolved) imports.
"""

from .threads import early_policy as _early_policy

_early_policy()  # before torch is imported: passive OpenMP waiting on shared cores (threads.py)

def __getattr__(name: str):
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("tpool")
        except metadata.PackageNotFoundError:
            return "unknown"
    raise AttributeError(f"module 'tpool_cli' has no attribute {name!r}")
