"""One module per `tpool` subcommand; each registers itself on `tpool_cli.cli.app`."""
