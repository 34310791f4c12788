"""The one exception type users see.

Every failure caused by the user's input (a missing file, a 2D image, an adapter of another model...) is raised
as :class:`ConvLoRASegError` with a one-line message. The CLI prints the message and exits with status 2; the
Slicer module shows it in a message box. Anything else is a bug and keeps its traceback.
"""


class ConvLoRASegError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Cancelled(Exception):
    """The user asked to stop (Cancel in Slicer, Ctrl-C or SIGTERM in the CLI); nothing was written."""
