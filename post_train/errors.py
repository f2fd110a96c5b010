"""ConfigError, in a module of its own so that the registries `post_train.config` validates with can raise it."""


class ConfigError(ValueError):
    """A recipe, scale or override that cannot become a valid configuration."""
