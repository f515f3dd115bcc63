"""CIFAR-10 data loading (numpy + Pillow; TensorFlow only imported for ``load_cifar10("keras")``).

Public API:

* :func:`load_cifar10` -> :class:`CifarData`; :data:`CIFAR10_CLASSES`
* :func:`read_labelled_images` (image folders and archives) and :class:`DataSourceError` (a
  ``ValueError``, for every bad input), from the shared :mod:`imagedata` package, which also
  decodes images and reads uploads for the HTTP service
* :func:`train_validation_split`
"""

from imagedata import DataSourceError, read_labelled_images

from .cifar import CIFAR10_CLASSES, CifarData, load_cifar10, recorded_data_source
from .split import train_validation_split

__all__ = ["CIFAR10_CLASSES", "CifarData", "DataSourceError", "load_cifar10", "read_labelled_images",
           "recorded_data_source", "train_validation_split"]
