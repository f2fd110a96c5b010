"""Errors that mean "do not retry": in a module of their own so that the registries `post_train.config` validates
with, and the training loop, can raise them without importing the configuration (and the CLI can catch them
without importing the data code)."""


class ConfigError(ValueError):
    """A recipe, scale or override that cannot become a valid configuration."""


class DataError(ValueError):
    """A dataset that cannot be used, with the file (or dataset name) and row that says why."""


class TrainingDiverged(RuntimeError):
    """Training stopped on a non-finite loss or gradient norm, or a loss far above its running level: the same
    configuration would diverge again, so a retry is no use."""
