"""Exceptions bonekern raises beyond ValueError/TypeError."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and what to do."""
