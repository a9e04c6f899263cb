"""Errors a user can cause. The CLI turns them into one clear paragraph and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a file, a line, a flag, a request. Never a bug in chatsmith."""
