"""The PyTorch port of Caffe nets: a layer registry (type → builder) and the prototxt → module builder."""

# pycaffe's layers (DummyData, Silence, Python) register themselves next to the core ones.
from lymph_cv.net import layers_extra  # noqa: E402,F401
