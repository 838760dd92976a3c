"""A pycaffe-compatible module on the PyTorch port: ``import lymph_cv.pycaffe as caffe``.

Provides ``Net``, ``Classifier``, ``TRAIN``/``TEST``, ``set_mode_cpu``/``set_mode_gpu``/
``set_device``/``set_random_seed`` and ``io`` (load_image, resize_image, oversample, Transformer,
blob and datum helpers, ``caffe_pb2``), so the tutorial's step-5 script runs with only its import
changed.  ``set_mode_gpu`` without a CUDA device logs a warning and stays on the CPU.
Mean handling is the tutorial era's (February 2015): see :mod:`lymph_cv.pycaffe.io`.
"""
from lymph_cv.pycaffe import io
from lymph_cv.pycaffe.classifier import Classifier
from lymph_cv.pycaffe.net import TEST, TRAIN, Blob, Net, set_device, set_mode_cpu, set_mode_gpu, set_random_seed

__all__ = ["Net", "Classifier", "Blob", "TRAIN", "TEST", "io", "set_mode_cpu", "set_mode_gpu", "set_device",
           "set_random_seed"]
