"""The one exception type of recap_ros.policy."""


class PolicyError(ValueError):
    """A bundle, backend or input problem. The message names the bad value and where it came from."""
