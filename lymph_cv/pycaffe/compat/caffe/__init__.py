"""``import caffe`` for legacy scripts: lymph_cv's pycaffe under Caffe's module names.

Only on ``sys.path`` when asked for (``PYTHONPATH=$(lymph-cv pycaffe-path)``), never installed as a
top-level ``caffe``, so it cannot shadow a real Caffe.  ``caffe.io``, ``caffe.net_spec``,
``caffe.coord_map``, ``caffe.classifier``, ``caffe.pycaffe`` and ``caffe.proto.caffe_pb2`` are the
very modules of ``lymph_cv``, registered under those names.
"""
import sys

import lymph_cv.formats.caffe as _proto
import lymph_cv.pycaffe as _pycaffe
from lymph_cv.pycaffe import *  # noqa: F401,F403 - the whole pycaffe API at the top level
from lymph_cv.pycaffe import __version__  # noqa: F401
from lymph_cv.pycaffe import classifier, coord_map, io, net_spec  # noqa: F401

# Caffe's submodule names → our modules; `import caffe.io` then finds them already imported.
for _name, _module in {"io": io, "net_spec": net_spec, "coord_map": coord_map, "classifier": classifier,
                       "pycaffe": _pycaffe, "proto": _proto, "proto.caffe_pb2": _proto.caffe_pb2}.items():
    sys.modules[f"{__name__}.{_name}"] = _module
proto = _proto
