"""Error types users see. Kept free of heavy imports so that the CLI can catch them cheaply."""


class ConfigError(ValueError):
    """A config value is malformed or missing; the message names the key."""


class InputError(ValueError):
    """An input (batch, file, argument) has the wrong shape, type or content; the message says what."""
