"""The one exception type users see: a one-line message naming the file, field, row or tensor."""


class DeltatuneError(ValueError):
    """A problem with the user's input (config, data, model, adapter) described in one line.

    The CLI prints ``str(error)`` to stderr and exits with code 2; no traceback.
    """
