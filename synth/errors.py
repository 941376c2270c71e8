"""The one error type the generator raises for bad input; the CLI prints it as one line."""
from __future__ import annotations


class SynthInputError(ValueError):
    """Bad input from the user: the message names the input and says what is wrong."""
