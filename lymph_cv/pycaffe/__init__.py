"""A pycaffe-compatible module on the PyTorch port: ``import lymph_cv.pycaffe as caffe``.

Everything BVLC Caffe's own Python tests use: ``Net`` (forward/backward over layer ranges, diffs,
NetState levels and stages, weights in .caffemodel and HDF5), the solvers on the ``lymph-cv train``
engine, Python layers (``caffe.Layer``), ``NetSpec`` with ``layers``/``params``, ``coord_map``,
``io``, ``Classifier``.  ``lymph-cv pycaffe-path`` prints a folder whose ``caffe`` package is this
module, so legacy scripts run unmodified with ``PYTHONPATH=$(lymph-cv pycaffe-path)``.
``set_mode_gpu`` without a CUDA device logs a warning and stays on the CPU.
Mean handling is the tutorial era's (February 2015): see :mod:`lymph_cv.pycaffe.io`.
"""
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.pycaffe import coord_map, io, net_spec
from lymph_cv.pycaffe.classifier import Classifier
from lymph_cv.pycaffe.net import (TEST, TRAIN, Blob, Net, set_device, set_mode_cpu, set_mode_gpu,
                                  set_random_seed)
from lymph_cv.pycaffe.net_spec import NetSpec, layers, params, to_proto
from lymph_cv.pycaffe.runtime import (Layer, Timer, has_nccl, init_log, layer_type_list, log_info as log,
                                      set_multiprocess, set_solver_count, set_solver_rank, solver_count,
                                      solver_rank)
from lymph_cv.pycaffe.solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                                     RMSPropSolver, SGDSolver, Solver, get_solver)

#: The Caffe release whose Python interface this follows.
__version__ = "1.0.0"

__all__ = ["Net", "Classifier", "Blob", "TRAIN", "TEST", "io", "caffe_pb2", "coord_map", "net_spec",
           "NetSpec", "layers", "params", "to_proto", "Layer", "layer_type_list", "Solver", "SGDSolver",
           "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "get_solver",
           "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "solver_count", "solver_rank",
           "set_solver_count", "set_solver_rank", "set_multiprocess", "has_nccl", "init_log", "log", "Timer",
           "__version__"]
