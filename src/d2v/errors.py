"""Error types users see. Kept free of heavy imports so that the CLI can catch them cheaply."""


class ConfigError(ValueError):
    """A config value is malformed or missing; the message names the key."""


class InputError(ValueError):
    """An input (batch, file, argument) has the wrong shape, type or content; the message says what."""


class CollapseError(RuntimeError):
    """Raised by the training health guards (collapse, NaN/Inf); the message names the quantity,
    its value and the step."""
