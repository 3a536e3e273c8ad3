"""The one exception type for user mistakes: the CLI prints its message on one line."""


class TwostageError(Exception):
    """A problem the user can fix (bad input, missing file, wrong config); never a bug."""
