"""The one exception type for mistakes a user can fix; the CLI prints it as a single line."""


class CtfgenError(Exception):
    """Bad input or a missing resource: the message says what is wrong and what to do."""
