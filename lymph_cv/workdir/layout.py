"""The work directory's file names, defined once (they mirror the tutorial's).

``{fold}`` is the fold number K (1-based).  See README.md, "The work directory".
"""
from __future__ import annotations

import re

from lymph_cv.errors import ConfigError

#: Step 0 (``lymph-cv synth``): the synthetic data set's record, in the data folder.
SYNTH_JSON = "synth.json"
#: Step 1: the patch folder (the tutorial's ``subs/``), its manifest, the tutorial's Matlab struct,
#: and (hidden) the parameters and sources of the run that wrote the patches.
PATCH_DIR = "subs"
MANIFEST_NAME = "manifest.json"
MAT_NAME = "class_struct.mat"
PATCH_PARAMS = ".patches.json"
#: Whole-slide tiling (``lymph-cv slides tile``), in the tile folder: the tile set, its table (one
#: tile a row), the quality-control images and the hidden per-slide completion records.
TILE_SET = "tiles.json"
TILE_TABLE = "tiles.csv"
TILE_QC_DIR = "qc"
TILE_MASK_PNG = "{slide}_mask.png"
TILE_GRID_PNG = "{slide}_grid.png"
TILE_DONE_DIR = ".tiles"
TILE_DB = "{slide}_{backend}"
#: Step 2: patch lists (``<patch>\t<label>``), parent lists (``CLASS/file.tif``), the record.
TRAIN_LIST = "train_w32_{fold}.txt"
TEST_LIST = "test_w32_{fold}.txt"
TRAIN_PARENT = "train_w32_parent_{fold}.txt"
TEST_PARENT = "test_w32_parent_{fold}.txt"
FOLDS_JSON = "folds.json"
#: Step 3: databases, mean files and their record.
DB_TRAIN = "DB_train_{fold}"
DB_TEST = "DB_test_{fold}"
MEAN_FILE = "DB_train_w32_{fold}.binaryproto"
DBS_JSON = "dbs.json"
#: Step 4, inside ``WORKDIR/{fold}/``: rendered configs and snapshot prefixes (as published).
SOLVER_NAME = "{fold}-alexnet_solver_ada.prototxt"
NET_NAME = "{fold}-alexnet_traing_32w_db.prototxt"
DEPLOY_NAME = "deploy_train32.prototxt"
SNAPSHOT_PREFIX = "{fold}_caffenet_train_w32"
DROPOUT_SNAPSHOT_PREFIX = "{fold}_caffenet_train_w32_dropout"
#: The training log (glog format, as `caffe train` writes it) beside the snapshots, and the records.
TRAIN_LOG = "train.log"
RENDER_JSON = "render.json"
TRAIN_JSON = "train.json"
JOBS_JSON = "jobs.json"
#: Inside ``WORKDIR/{fold}/``: the identity of the training its snapshots belong to, and where the
#: snapshots of earlier settings are kept (``superseded/<key>/``) when `run` trains with new ones.
TRAIN_KEY_JSON = "train_key.json"
SUPERSEDED_DIR = "superseded"
#: Step 5: evaluation outputs (``eval/fold_{fold}/`` and the pooled report).
EVAL_DIR = "eval"
EVAL_FOLD_DIR = "fold_{fold}"
REPORT_MD = "report.md"
#: Inside ``eval/fold_{fold}/`` and ``eval/``.
METRICS_JSON = "metrics.json"
SUMMARY_TXT = "summary.txt"
IMAGES_CSV = "images.csv"
CONFUSION_PNG = "confusion.png"
REPORT_JSON = "report.json"
REPORT_TXT = "report.txt"
REPORT_HTML = "report.html"
#: Per-image overlays inside ``eval/fold_{fold}/`` (``evaluate --heatmaps``).
HEATMAP_DIR = "heatmaps"
#: PatchCamelyon imported as fold 1: train → DB_train_1, valid → DB_test_1 (tested during training),
#: test → the held-out DB and list below; the import's record.
HELDOUT_DB = "DB_heldout_{fold}"
HELDOUT_LIST = "heldout_w32_{fold}.txt"
PCAM_JSON = "pcam.json"
#: The orchestrator's record.
RUN_JSON = "run.json"
#: Stain normalisation records (``--stain``): in the patch folder (the target the patches were cut
#: with), and per fold in the work directory (the target fitted on that fold's training images).
STAIN_RECORD = "stain.json"
FOLD_STAIN_RECORD = "stain_{fold}.json"

#: Multiple-instance learning (issue 15): the bag set (patients, images or cases and their instances),
#: the patient-level splits' record, and per split the bag lists (``<bag id><TAB><label>``).
BAGS_JSON = "bags.json"
BAG_FOLDS_JSON = "bag_folds.json"
BAG_TRAIN_LIST = "bags_train_{fold}.txt"
BAG_TEST_LIST = "bags_test_{fold}.txt"

#: The list names above as patterns: group 1 the side (train/test), group 2 the fold K.
LIST_PATTERN = re.compile(r"^(train|test)_w32_(\d+)\.txt$")
PARENT_PATTERN = re.compile(r"^(train|test)_w32_parent_(\d+)\.txt$")
BAG_LIST_PATTERN = re.compile(r"^bags_(train|test)_(\d+)\.txt$")
EVAL_FOLD_PATTERN = re.compile(r"fold_(\d+)$")
#: Snapshot files: ``<prefix>_iter_<N>.<caffemodel|solverstate>``.
SNAPSHOT_PATTERN = re.compile(r"^(?P<prefix>.*)_iter_(?P<iteration>\d+)\.(?P<suffix>caffemodel|solverstate)$")


def parse_class_names(text: str) -> tuple[str, ...]:
    """``"CLL,FL,MCL"`` → the class names in label order; ConfigError unless two or more distinct names."""
    names = tuple(name.strip() for name in text.split(","))
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"expected two or more distinct comma-separated class names, e.g. CLL,FL,MCL, got {text!r}")
    return names


def heatmap_name(entry: str) -> str:
    """A flat PNG name for a parent-list entry (``CLL/x.tif`` → ``CLL__x.png``)."""
    stem = re.sub(r"\.tif{1,2}$", "", entry, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem.replace("/", "__")) + ".png"
