"""The one error of the data readers, with a machine-readable code.

`code` is stable and is what callers branch on (the HTTP service maps it onto its API codes);
the message is for people and may be reworded freely.
"""

from __future__ import annotations

__all__ = ["DataSourceError", "CODES"]

# Every code a reader raises, and what it means.
CODES = {
    "invalid_source": "a path, archive or batch file is missing, unreadable or malformed",
    "undecodable_image": "an image file is empty, damaged or not a JPEG/PNG",
    "wrong_image_size": "an image is not 32x32 (and resizing was not asked for)",
    "unsupported_image_mode": "an image is 32x32 but not RGB (and converting was not asked for)",
    "image_too_large": "an image has more pixels than the decoder accepts",
    "too_many_images": "a source holds more images than the caller allows",
    "member_too_large": "an archive member declares more bytes than the per-file cap",
    "archive_too_large": "an archive's members declare more bytes in total than the caller allows",
    "invalid_layout": "images are not in <class>/<image> folders, or a folder is not a known class",
    "invalid_array_file": "an .npy/.npz file cannot be read as plain arrays",
    "invalid_dtype": "an array holds Python objects (pickles are never loaded)",
    "array_too_large": "an array declares more elements or bytes than the caller allows",
}


class DataSourceError(ValueError):
    """A data source (path, archive, batch file, array file or image) is missing or malformed.

    The message always names the offending path, archive member or file; `code` (one of
    `CODES`) says what kind of problem it is. A `ValueError`, so callers that validate user
    input can map it to a 4xx answer.
    """

    def __init__(self, message: str, code: str = "invalid_source"):
        if code not in CODES:
            raise ValueError(f"unknown DataSourceError code {code!r}")
        super().__init__(message)
        self.code = code
