"""User-facing errors.

Every mistake a user can make (a malformed row, a wrong config key, a missing checkpoint, a NaN loss) raises a
subclass of `StarlingError` whose message names the file, row and field. Entry points catch `StarlingError`
and print it as one line (no traceback), exiting with status 2.
"""


class StarlingError(Exception):
    """Base class: a user mistake or bad input, reported as a one-line message."""


class ConfigError(StarlingError):
    """Unknown config key, bad value or missing config file."""


class UsageError(ConfigError):
    """A command-line flag is unknown, missing or malformed (argparse's usage errors, raised by
    `cli.ArgumentParser`)."""


class DataError(StarlingError):
    """A data file is missing or a row is malformed (message names file, row and field)."""


class CheckpointError(StarlingError):
    """A checkpoint or model folder is missing, incomplete or does not match the model."""


class TrainingError(StarlingError):
    """Training cannot go on (e.g. a NaN/inf loss); nothing bad was checkpointed."""
