"""One module per `tpool` subcommand: plain functions that :mod:`tpool_cli.cli` registers on its app.

Commands parse and print; what several of them share lives in :mod:`.common` (commands never
import each other). Heavy libraries (torch, timm, fvcore, matplotlib) are imported inside the
command functions, so ``tpool --help`` loads none of them.
"""
