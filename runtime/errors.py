"""The one exception type for a problem with what the user gave us: the CLI prints it as one sentence."""


class UserError(Exception):
    """A problem with the user's input (option, file, dataset); printed as one sentence, no traceback."""
