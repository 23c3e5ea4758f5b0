"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, on one line."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type where it has none): what a
    one-line `UserError` quotes of an error from a library."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__
