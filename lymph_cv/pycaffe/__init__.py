"""A pycaffe-compatible module: ``import lymph_cv.pycaffe as caffe``."""
