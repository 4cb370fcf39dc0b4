"""The exceptions that cross engine's packages.

UserError is the one error type a user sees for bad input: raised before any heavy work, its
message names the value to change. Launchers catch it, print the message and exit with status
2, leaving no run directory behind.
"""


class UserError(Exception):
    """Bad input from the command line or the data: the message says what to change."""


class EvaluationInterrupted(Exception):
    """Every rank stopped evaluating at the same batch because a stop was agreed (raised by
    engine/eval/shard.py, caught by the training loop)."""
