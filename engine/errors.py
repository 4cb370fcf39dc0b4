"""The one error type a user sees for bad input.

Raised before any heavy work; its message names the value to change. Launchers catch it,
print the message and exit with status 2, leaving no run directory behind.
"""


class UserError(Exception):
    """Bad input from the command line or the data: the message says what to change."""
