"""The one error type of the method's code that means "the user's input is wrong", not "a bug"."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (libraries put the reason there), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InputError(ValueError):
    """Bad data or weights that a user supplied: reported as one line naming the file and what would be
    valid, never retried."""
