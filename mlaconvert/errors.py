"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""


class MlaconvertError(Exception):
    """A problem with the user's input or environment, explained in one line."""
