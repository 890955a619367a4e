"""The one exception type sipit raises for bad input: its message is a single line for the user."""


class SipitError(ValueError):
    """Bad input or an impossible request; the CLI prints the message and exits non-zero."""
