"""CIFAR-10 data loading (numpy + Pillow; TensorFlow only imported for ``load_cifar10("keras")``).

Public API:

* :func:`load_cifar10` -> :class:`CifarData`; :data:`CIFAR10_CLASSES`
* :func:`read_labelled_images`, :func:`read_labelled_images_from_bytes`,
  :func:`decode_image` (image folders / uploads, used by the HTTP service)
* :func:`train_validation_split`
* :class:`DataSourceError` (a ``ValueError``) for every bad input
"""

from .cifar import CIFAR10_CLASSES, CifarData, load_cifar10, recorded_data_source
from imagedata.errors import DataSourceError
from imagedata.image_folder import (
    IMAGE_EXTENSIONS,
    IMAGE_SIZE,
    decode_image,
    read_labelled_images,
    read_labelled_images_from_bytes,
)
from .split import train_validation_split

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_EXTENSIONS",
    "IMAGE_SIZE",
    "CifarData",
    "DataSourceError",
    "decode_image",
    "load_cifar10",
    "read_labelled_images",
    "read_labelled_images_from_bytes",
    "recorded_data_source",
    "train_validation_split",
]
