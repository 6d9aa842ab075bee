"""The error type for bad user input: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input (config, data, paths, checkpoints). The message is the whole story."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, torn, corrupted, incompatible)."""
