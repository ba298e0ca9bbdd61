"""The one error type that user input raises, so every front end can print it as a single line."""


class InputError(ValueError):
    """Bad user input: the message names the field, the bad value and what was expected."""


def bad(field: str, value, expected: str) -> InputError:
    """Build the house-style message: `field = value: expected ...`."""
    return InputError(f"{field} = {value!r}: expected {expected}")
