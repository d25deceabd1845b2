"""User-facing errors.

Anything a user can cause (bad path, wrong model pair, empty prompt, ...) raises `CastspecError` with a one-line
message saying what to do. The CLI prints the message and exits with code 2 instead of showing a traceback.
"""


class CastspecError(Exception):
    """A problem with the user's input or environment, explained in one line."""
