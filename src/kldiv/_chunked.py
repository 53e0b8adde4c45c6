"""Temporary: the streaming helpers moved to :mod:`kldiv._stream` and :mod:`kldiv._files`."""
from ._files import BACKENDS, DataFileError, evaluate_files  # noqa: F401
from ._stream import evaluate_batches  # noqa: F401
