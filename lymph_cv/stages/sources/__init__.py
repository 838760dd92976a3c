"""Data sources (where a data set's images are), a registry like the layer registry.

Built in: ``folders`` (one folder of images per class, the tutorial's layout), ``bags`` (one folder
of cell images per patient plus a clinical CSV, the lymphocytosis layout) and ``slides`` (whole
slides by class folder or a ``slide,label[,case]`` CSV).
"""
from lymph_cv.stages.sources import folders, patients, slides  # noqa: F401 - importing registers them
from lymph_cv.stages.sources.registry import (DEFAULT_SOURCE, SOURCES, DataSource, SourceImage, data_source,
                                              input_fingerprint, register)

__all__ = ["DEFAULT_SOURCE", "SOURCES", "DataSource", "SourceImage", "data_source", "input_fingerprint",
           "register"]
