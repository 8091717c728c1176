"""User-facing errors: one clear line, exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, paths). The CLI prints it as one line and exits 2."""

    exit_code = 2

