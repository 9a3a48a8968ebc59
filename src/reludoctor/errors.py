"""Errors that mean "the input was wrong": the CLI turns them into exit code 2."""


class InputError(ValueError):
    """Bad input from the user (a file, a shape, an option), with what to do about it."""


class UntrustedFileError(InputError):
    """A file that would run code when loaded, refused unless the user trusts it."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when it has none), for a
    one-line message that quotes it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
