"""The exporters' errors: a bad checkpoint, a failed parity check, any export failure."""

class ExportError(Exception):
    """An export that cannot be completed; the message is one line."""


class CheckpointError(ExportError):
    """A model directory that is missing or does not hold a loadable model."""


class ParityError(ExportError):
    """An exported artifact whose outputs differ from the Keras model's."""


def first_line(error):
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 600 else line[:597] + "..."
