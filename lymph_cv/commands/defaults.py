"""Stage defaults and choices that the commands' options show in ``--help``, spelled out here so
that loading a command imports no stage module (numpy, OpenCV: a quarter of a second of start-up).

Each name's source of truth is the stage constant :data:`SOURCES` names; tests/test_fast_paths.py
holds every value here to it (a function: to its result, a mapping: to its keys, as a tuple), as
``cli.SUMMARIES`` is held to the commands.
"""
from __future__ import annotations

# synth (stages/synth.py: the real images; stages/synth_bags.py: --layout bags)
REAL_CASES_PER_CLASS, REAL_WIDTH, REAL_HEIGHT = 10, 1388, 1040
DEFAULT_PATIENTS, DEFAULT_CELLS, DEFAULT_ABNORMAL = 80, (20, 60), (0.2, 0.4)
MIN_CELL_SIZE, DEFAULT_CELL_SIZE, DEFAULT_CLINICAL_SIGNAL = 24, 64, 0.5
# bags (stages/bags.py, stages/sources/patients.py, stages/bag_folds.py)
BAG_KINDS, BAG_CLASSES, IMPUTE_CHOICES = ("patient", "image", "case", "slide"), ("reactive", "tumoral"), ("none", "median")
REFERENCE_DATE = "2021-01-01"
SPLIT_METHODS, SPLIT_GROUPS, DEFAULT_REPEATS = ("kfold", "random", "folds"), ("patient", "bag"), 10
# patches (core/grid.py) and folds (stages/folds.py)
WINDOW_SIZE, WINDOW_STEP = 36, 32
DEFAULT_K, GROUP_BY = 5, ("image", "case", "site")
# inspect (formats/inspect.py), import pcam (formats/h5.py)
DEFAULT_KEY_LIMIT, H5_READ_CHUNK = 10, 1024
# evaluate (stages/evaluate.py, the aggregation registry's built-in entries)
MEAN_MODES = ("resize", "crop")
PRECISIONS = ("float32", "bfloat16")
DEFAULT_BATCH_SIZES = {"cpu": 320, "cuda": 5120}
AGGREGATION_CHOICES = ("vote", "mean", "topk:K")
# render --set (stages/render.py's template variables, in their order)
RENDER_VARIABLES = (
    "test_iter", "test_interval", "base_lr", "lr_policy", "gamma", "power", "stepsize", "stepvalue", "momentum",
    "random_seed", "display", "max_iter", "weight_decay", "snapshot", "snapshot_prefix", "solver_type", "batch_size",
    "crop_size", "dropout_ratio", "bn_moving_average", "num_classes", "backend", "net_name", "weight_lr_mult",
    "bias_lr_mult", "mixup_alpha", "label_smoothing", "vertical_flip", "rotate90", "stain_jitter",
    "stain_scale_sigma", "stain_shift_sigma",
)
# run --from / --executor (pipeline.py: PIPELINE's stage names; the executors' registry)
RUN_STAGES = ("synth", "patches", "tiles", "folds", "dbs", "render", "train", "evaluate", "slide_eval", "report",
              "bags", "mil")
EXECUTORS = ("local", "pbs", "slurm")
# render/run --arch, --stem (net/archs: the registered nets, name and description, sorted)
ARCH_HELP = (
    ("alexnet32w", "the tutorial's 32w net (default)"),
    ("alexnet32w-dropout", "32w with relu+dropout after ip1 and ip2"),
    ("resnet18", "ResNet-18, basic blocks"),
    ("resnet34", "ResNet-34, basic blocks"),
    ("resnet50", "ResNet-50, bottleneck blocks"),
)
DEFAULT_ARCH, STEMS = "alexnet32w", ("cifar", "imagenet")
# slides tissue | tile (stages/tissue.py)
TISSUE_METHODS, DEFAULT_TISSUE_METHOD = ("saturation", "od"), "saturation"
DEFAULT_MASK_SIDE, DEFAULT_MIN_TISSUE = 2048, 0.5
# submit (cluster/spec.py, cluster/schedulers.py)
SCHEDULERS, TILES_TASK = ("pbs", "slurm", "local"), "tiles"
DEFAULT_WALLTIME, DEFAULT_PPN, DEFAULT_GPUS = "320:00:00", 1, 0
# plot-log --chart (stages/curves.py: Caffe's chart numbers and our names)
CHART_HELP = ((0, "test-accuracy-iterations"), (1, "test-accuracy-seconds"), (2, "test-loss-iterations"),
              (3, "test-loss-seconds"), (4, "train-lr-iterations"), (5, "train-lr-seconds"),
              (6, "train-loss-iterations"), (7, "train-loss-seconds"))
# dbs --backend, slides tile --db (formats/store.py)
BACKENDS, DEFAULT_BACKEND = ("leveldb", "lmdb"), "leveldb"
# export (net/onnx_export.py)
MIN_OPSET, DEFAULT_OPSET = 13, 17

#: Each constant above → "module:attribute" it must equal.
SOURCES = {
    "REAL_CASES_PER_CLASS": "lymph_cv.stages.synth:REAL_CASES_PER_CLASS",
    "REAL_WIDTH": "lymph_cv.stages.synth:REAL_WIDTH",
    "REAL_HEIGHT": "lymph_cv.stages.synth:REAL_HEIGHT",
    "DEFAULT_PATIENTS": "lymph_cv.stages.synth_bags:DEFAULT_PATIENTS",
    "DEFAULT_CELLS": "lymph_cv.stages.synth_bags:DEFAULT_CELLS",
    "DEFAULT_ABNORMAL": "lymph_cv.stages.synth_bags:DEFAULT_ABNORMAL",
    "MIN_CELL_SIZE": "lymph_cv.stages.synth_bags:MIN_CELL_SIZE",
    "DEFAULT_CELL_SIZE": "lymph_cv.stages.synth_bags:DEFAULT_CELL_SIZE",
    "DEFAULT_CLINICAL_SIGNAL": "lymph_cv.stages.synth_bags:DEFAULT_CLINICAL_SIGNAL",
    "BAG_KINDS": "lymph_cv.stages.bags:BAG_KINDS",
    "BAG_CLASSES": "lymph_cv.stages.sources.patients:BAG_CLASSES",
    "IMPUTE_CHOICES": "lymph_cv.stages.sources.patients:IMPUTE_CHOICES",
    "REFERENCE_DATE": "lymph_cv.stages.sources.patients:REFERENCE_DATE_TEXT",
    "SPLIT_METHODS": "lymph_cv.stages.bag_folds:SPLIT_METHODS",
    "SPLIT_GROUPS": "lymph_cv.stages.bag_folds:SPLIT_GROUPS",
    "DEFAULT_REPEATS": "lymph_cv.stages.bag_folds:DEFAULT_REPEATS",
    "WINDOW_SIZE": "lymph_cv.core.grid:WINDOW_SIZE",
    "WINDOW_STEP": "lymph_cv.core.grid:WINDOW_STEP",
    "DEFAULT_K": "lymph_cv.stages.folds:DEFAULT_K",
    "GROUP_BY": "lymph_cv.stages.folds:GROUP_BY",
    "DEFAULT_KEY_LIMIT": "lymph_cv.formats.inspect:DEFAULT_KEY_LIMIT",
    "H5_READ_CHUNK": "lymph_cv.formats.h5:READ_CHUNK",
    "MEAN_MODES": "lymph_cv.stages.evaluate:MEAN_MODES",
    "PRECISIONS": "lymph_cv.stages.evaluate:PRECISIONS",
    "DEFAULT_BATCH_SIZES": "lymph_cv.stages.evaluate:DEFAULT_BATCH_SIZES",
    "AGGREGATION_CHOICES": "lymph_cv.stages.aggregate:aggregation_choices",
    "RENDER_VARIABLES": "lymph_cv.stages.render:VARIABLES",
    "TISSUE_METHODS": "lymph_cv.stages.tissue:METHODS",
    "DEFAULT_TISSUE_METHOD": "lymph_cv.stages.tissue:DEFAULT_METHOD",
    "DEFAULT_MASK_SIDE": "lymph_cv.stages.tissue:DEFAULT_MASK_SIDE",
    "DEFAULT_MIN_TISSUE": "lymph_cv.stages.tissue:DEFAULT_MIN_TISSUE",
    "RUN_STAGES": "lymph_cv.pipeline:STAGES",
    "EXECUTORS": "lymph_cv.pipeline:EXECUTORS",
    "ARCH_HELP": "lymph_cv.net.archs.registry:arch_help",
    "DEFAULT_ARCH": "lymph_cv.net.archs.registry:DEFAULT_ARCH",
    "STEMS": "lymph_cv.net.archs.registry:STEMS",
    "SCHEDULERS": "lymph_cv.cluster.schedulers:SCHEDULERS",
    "TILES_TASK": "lymph_cv.cluster.spec:TILES_TASK",
    "DEFAULT_WALLTIME": "lymph_cv.cluster.spec:DEFAULT_WALLTIME",
    "DEFAULT_PPN": "lymph_cv.cluster.spec:DEFAULT_PPN",
    "DEFAULT_GPUS": "lymph_cv.cluster.spec:DEFAULT_GPUS",
    "CHART_HELP": "lymph_cv.stages.curves:chart_help",
    "BACKENDS": "lymph_cv.formats.store:BACKENDS",
    "DEFAULT_BACKEND": "lymph_cv.formats.store:LEVELDB",
    "MIN_OPSET": "lymph_cv.net.onnx_export:MIN_OPSET",
    "DEFAULT_OPSET": "lymph_cv.net.onnx_export:DEFAULT_OPSET",
}
