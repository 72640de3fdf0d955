"""Error vocabulary shared by every stage.

Per-record failures travel as values (an error row with a stage and a code), never as
exceptions that escape a batch. Configuration problems are exceptions raised before any
work starts.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad option, a bad model reference or an unreachable input: fail before any work."""


class RecordError(Exception):
    """One input record could not be processed; becomes one row of the errors table.

    Attributes:
        code: A stable snake_case error code (see ``ERROR_CODES``).
        message: A human-readable explanation; never contains credentials.
    """

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# Stages an error row can come from, in pipeline order.
STAGES = ("input", "read", "decode", "caption", "tag", "embed")

# Every error code the pipeline writes, with the stage that writes it.
ERROR_CODES = {
    # input: the listing or manifest row itself is unusable.
    "invalid_uri": "input",
    # read: fetching the object's bytes.
    "not_found": "read",
    "permission_denied": "read",
    "file_too_large": "read",
    "read_failed": "read",
    # decode: turning bytes into pixels.
    "empty_file": "decode",
    "unrecognized_format": "decode",
    "truncated_image": "decode",
    "decompression_bomb": "decode",
    "image_too_small": "decode",
    "decode_failed": "decode",
    # caption: the model call for this image failed.
    "model_error": "caption",
    # tag: keyword extraction for this image's caption failed.
    "tagging_error": "tag",
    # embed: the text embedding of this image's caption failed.
    "embedding_error": "embed",
}
