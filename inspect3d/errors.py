"""User-facing errors: one exception type whose message names the bad value and the fix."""


class InspectError(ValueError):
    """Bad input from a user: a path, a config value, a file. The message says what is valid."""
