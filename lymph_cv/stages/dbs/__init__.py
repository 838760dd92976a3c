"""Step 3: image lists → LevelDB/LMDB databases of Caffe Datums, and mean files.

Two ways to the same databases:

* from patch files, as Caffe's ``convert_imageset`` does: each list line ``<file> <label>``
  names an image under a root folder, read as OpenCV's colour ``imread`` reads it (BGR);
* straight from the source images (``images=``): the patches named in the lists are cut from
  the images into one array in shared memory (a temporary file when it would not fit),
  never written as files.

Both give byte-identical databases for the same lists and seed: record ``i`` is list line
``order[i]`` where ``order`` is a seeded permutation (numpy ``default_rng(seed).permutation``;
Caffe's own ``-shuffle`` is unseeded), stored under Caffe's key ``%08d_<file>`` as a raw
Datum (uint8, channel-major C × H × W, ``encoded: false``).  The mean file is computed as
``compute_image_mean`` does: a float32 running sum in database order, then divided by the
count (see :class:`MeanAccumulator`).

The package: :mod:`.lists` (list lines, patch names, the record order; the mean arithmetic is
``formats.caffe.mean``), :mod:`.convert` (``convert_imageset``'s options, one database, its mean),
:mod:`.cache` (the shared patch array of ``--images``), :mod:`.build` (a work folder's databases,
their freshness in ``dbs.json``, the run's stage).
"""
from __future__ import annotations

import importlib

#: Each name of the package's API and the module that defines it; a module loads on first use, so
#: ``convert_imageset`` (``.convert``) starts without the stage, the patch cache and their imports.
_EXPORTS = {
    "lymph_cv.formats.caffe.mean": ("MEAN_PROGRESS_EVERY", "MeanAccumulator", "channel_means", "mean_of_db"),
    "lymph_cv.stages.dbs.build": ("STAGE", "DbsStage", "build_dbs", "folds_record", "list_signature",
                                  "read_dbs_json", "store_kind"),
    "lymph_cv.stages.dbs.convert": ("DECODE_CHUNK", "DEFAULT_BACKEND", "DEFAULT_SEED", "PLAIN", "DbResult",
                                    "ImageOptions", "convert_list", "record_value", "save_mean", "write_db",
                                    "write_db_batches"),
    "lymph_cv.stages.dbs.lists": ("check_relative", "read_image_list", "shuffled_order"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    """The package's API names, imported from their modules on first use (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
