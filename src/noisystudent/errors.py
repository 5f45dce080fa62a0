"""The one exception type the CLI turns into a one-line message (no traceback)."""


class UserError(Exception):
    """A problem with the user's input (a path, a config key, a file) that they can fix.

    The message is a single line naming the file or option and what to do.
    """
