"""User-facing errors of data prep: reported as one message and a non-zero exit code, no traceback."""
from __future__ import annotations

from longtrain.errors import UserError  # torch-free: data prep never imports torch


class DataPrepError(UserError):
    """A problem the user can fix (bad option, bad input, missing file).

    The message names what is wrong (file, line, option) and what to do; the CLI prints it
    without a traceback and exits with status 2 (longtrain.errors).
    """


class BadDocument(DataPrepError):
    """One input document is unusable. ``--skip-bad`` skips it and counts it under ``reason``."""

    def __init__(self, reason: str, where: str, detail: str, hint: str = ""):
        self.reason, self.where, self.detail, self.hint = reason, where, detail, hint
        todo = f"{hint[:1].upper()}{hint[1:]}, or pass" if hint else "Pass"
        super().__init__(f"{where}: {detail} [{reason}]. {todo} --skip-bad to skip such documents "
                         "(they are counted and reported).")


# Reasons a document is skipped, with the hint shown in the error. Kept in one place so the
# docs, the counters in meta.json and the tests agree on the names.
REASONS = {
    "invalid_json": "fix the line (each line must be one JSON object)",
    "not_an_object": "each JSONL line must be a JSON object such as {\"text\": \"...\"}",
    "missing_text_field": "choose the field with --text-field",
    "text_not_string": "the text field must hold a string",
    "not_utf8": "re-encode the file as UTF-8",
    "binary_file": "exclude it with a narrower glob (e.g. 'DIR/**/*.py')",
    "too_large": "raise --max-doc-bytes, or split the document",
    "empty": "remove empty documents",
    # Whole files: the documents of a compressed file read before the damage are kept, the rest of
    # the file counts once under damaged_input (how many documents it held cannot be known).
    "damaged_input": "the file is truncated or damaged: copy or download it again (check its size or checksum)",
    "unsupported_compression": "decompress it, or recompress it with gzip, bzip2, xz or zstd",
}
