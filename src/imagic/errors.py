"""Errors the user can cause. Each message is one line that says what to do; the CLI prints it
and exits with status 2."""


class ImagicError(Exception):
    """Base class: something about the input, not a bug in imagic."""


class InputError(ImagicError):
    """A bad image, text, number or path given by the user."""


class ModelError(ImagicError):
    """A model that cannot be found, or that imagic refuses to load."""


class SessionError(ImagicError):
    """An edit session folder that is missing, damaged or made for another model."""
