"""Multiple-instance learning over bags (patients, images, slides): pooling heads behind a registry
(:mod:`.registry`), the clinical MLP and fusion (:mod:`.clinical`), the bag model around a Caffe
instance encoder (:mod:`.model`) and its protobuf storage (:mod:`.storage`).

Importing a method module registers it; the order is the order of the choices in help and errors.
"""
from lymph_cv.net.mil import vote  # noqa: F401, I001
from lymph_cv.net.mil import mean  # noqa: F401, I001
from lymph_cv.net.mil import maximum  # noqa: F401, I001
from lymph_cv.net.mil import topk  # noqa: F401, I001
from lymph_cv.net.mil import learned  # noqa: F401, I001
from lymph_cv.net.mil import attention  # noqa: F401, I001
from lymph_cv.net.mil.registry import (METHODS, BagOutput, HeadConfig, KSpec, MILHead, MILMethod, build_head,
                                       get_method, method_names, parse_k, register)

__all__ = ["METHODS", "BagOutput", "HeadConfig", "KSpec", "MILHead", "MILMethod", "build_head", "get_method",
           "method_names", "parse_k", "register"]
