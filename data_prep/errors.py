"""The one exception type users see.

Every bad input (a missing file, a malformed line, a wrong setting) is reported as a
single line naming the file or key and the problem; the CLI prints it and exits non-zero.
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or settings, reported as one line."""
