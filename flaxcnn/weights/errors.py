"""The one exception type for weight files, so the CLI can print it as a single line."""


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the model; the message says why."""
