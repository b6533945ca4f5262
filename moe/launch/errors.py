"""The error of `moe launch`."""
from moe.errors import MoeError


class LaunchError(MoeError):
    """Bad launch options or a failed submission; the message is shown to the user as is."""
