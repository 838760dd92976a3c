"""The work directory's file names, defined once (they mirror the tutorial's).

``{fold}`` is the fold number K (1-based).  See README.md, "The work directory".
"""
from __future__ import annotations

import re

#: Step 1: the patch folder (the tutorial's ``subs/``) and its manifest.
PATCH_DIR = "subs"
MANIFEST_NAME = "manifest.json"
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


def heatmap_name(entry: str) -> str:
    """A flat PNG name for a parent-list entry (``CLL/x.tif`` → ``CLL__x.png``)."""
    stem = re.sub(r"\.tif{1,2}$", "", entry, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem.replace("/", "__")) + ".png"
