"""Errors that mean "the input was wrong": the CLI turns them into exit code 2."""


class InputError(ValueError):
    """Bad input from the user (a file, a shape, an option), with what to do about it."""


class UntrustedFileError(InputError):
    """A file that would run code when loaded, refused unless the user trusts it."""
