"""The one error type for user mistakes.

Anything raised as :class:`TpoolError` is the user's to fix (a bad path, an unknown name, a keep
rate out of range). The CLI catches it once, prints one red line on stderr and exits with code 2.
Every other exception is a bug in tpool and keeps its traceback.
"""


class TpoolError(Exception):
    """A mistake in what the user asked for, reported as one line without a traceback."""
