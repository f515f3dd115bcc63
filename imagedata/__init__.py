"""Image data from bytes and files, with the limits that keep hostile input cheap.

Shared by the HTTP service (uploads) and training (CIFAR-10 image folders); numpy and Pillow
only, no TensorFlow, no web framework. Every problem is a `DataSourceError` whose `code` says
what kind it is (`imagedata.errors.CODES`), so callers never match messages.

* `decode_image`: one JPEG/PNG -> uint8 [32, 32, 3]
* `read_labelled_images`, `read_labelled_images_from_bytes`: `<class>/<image>` folders and
  archives, each member's declared size checked (and the archive's total) before it is read
* `arrays.load_npy`, `arrays.load_npz`: `.npy`/`.npz` read header-first, only the members asked
  for, refused on declared shape and size before anything is inflated
"""

from .errors import CODES, DataSourceError
from .image_folder import (
    IMAGE_EXTENSIONS,
    IMAGE_SIZE,
    decode_image,
    read_labelled_images,
    read_labelled_images_from_bytes,
)

__all__ = [
    "CODES",
    "IMAGE_EXTENSIONS",
    "IMAGE_SIZE",
    "DataSourceError",
    "decode_image",
    "read_labelled_images",
    "read_labelled_images_from_bytes",
]
