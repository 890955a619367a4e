"""sipit: do this model's hidden states give away the prompt? Capture, audit and invert them.

    >>> import sipit
    >>> states = sipit.capture("shakespeare-llama", "To be, or not to be", layer=2)
    >>> sipit.invert(states).text
    'To be, or not to be'
"""

__version__ = "0.1.0"

from sipit.capture import capture  # noqa: E402
from sipit.errors import SipitError  # noqa: E402
from sipit.invert import invert  # noqa: E402
from sipit.lm import load  # noqa: E402

__all__ = ["capture", "invert", "load", "SipitError", "__version__"]
