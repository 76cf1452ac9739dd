"""The one exception type for input data a user must fix (kept apart so every data module can raise it)."""

from unetdist.config import UserError


class DataError(UserError, ValueError):
    """Input data a user must fix; the message names the file and what is wrong."""
