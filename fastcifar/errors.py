"""The one exception type users see: a one-line message they can act on."""


class FastCifarError(Exception):
    """A problem the user can fix (bad input, missing data, bad option); printed without traceback."""
