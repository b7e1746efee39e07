"""lora_kit's own error type.

Every error a user can cause (a bad file, an unknown model, settings that contradict each
other) is raised as a ``LoraKitError``. It subclasses ``ValueError`` so code that already
catches ``ValueError`` keeps working, and its message always says what was received, where,
what was expected and what to do.
"""


class LoraKitError(ValueError):
    """A problem with what the user passed in; the message says how to fix it."""


class DataFormatError(LoraKitError):
    """A data file or record that lora_kit cannot turn into conversations."""
