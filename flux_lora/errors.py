"""Errors a user can act on. Their message is shown as is: no stack trace, no secrets."""


class UserError(Exception):
    """Base class: anything raised as a UserError reaches the user as its message alone."""
