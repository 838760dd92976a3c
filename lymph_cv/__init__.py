"""lymph_cv: Janowczyk's lymphoma sub-type classification tutorial, in Python, Caffe-compatible."""

__version__ = "0.1.0"

#: The tutorial's classes; a class's label is its position in this tuple.
DEFAULT_CLASSES = ("CLL", "FL", "MCL")
