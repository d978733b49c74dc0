"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class QLimitError(Exception):
    """A problem with the user's input (model, data, options), not a bug in onnxqlimit."""


class UnsupportedModelError(QLimitError):
    """The model uses ops or op features the mirror cannot reproduce exactly."""


class UnsupportedNodeError(QLimitError):
    """Raised by an op converter when one node uses a feature it does not implement."""


def check_one_of(flag: str, value, allowed) -> None:
    """Refuse a setting outside its choices: '--method must be one of rtn, ... (got 'x')'."""
    if value not in allowed:
        raise QLimitError(f"{flag} must be one of {', '.join(map(str, allowed))} (got {value!r})")
