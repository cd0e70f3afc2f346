"""The one error type of the method's code that means "the user's input is wrong", not "a bug"."""


class InputError(ValueError):
    """Bad data or weights that a user supplied: reported as one line naming the file and what would be
    valid, never retried."""
