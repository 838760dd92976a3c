"""Network architectures rendered as Caffe prototxt (see :mod:`lymph_cv.net.archs.registry`)."""
from lymph_cv.net.archs import alexnet, resnet  # noqa: F401  (each registers its entries)
from lymph_cv.net.archs.registry import (ARCHS, DEFAULT_ARCH, STEMS, Arch, arch_names, get_arch,
                                         register_arch)

__all__ = ["ARCHS", "DEFAULT_ARCH", "STEMS", "Arch", "arch_names", "get_arch", "register_arch"]
