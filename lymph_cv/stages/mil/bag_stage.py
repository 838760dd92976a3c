"""``run --mil``'s first own stage: the bag set (``bags.json``: patient folders + clinical CSV, or the
patch manifest's images / cases) and its patient-level k-fold splits (``bags_train/test_K.txt``)."""
from __future__ import annotations

from pathlib import Path

from lymph_cv.errors import ConfigError
from lymph_cv.stages.bag_folds import split_bags
from lymph_cv.stages.bags import PATCH_BAG_KINDS, bags_from_patches, load_bags, write_bags
from lymph_cv.stages.patches import PATIENT_BAGS
from lymph_cv.stages.sources import input_fingerprint
from lymph_cv.stages.stage import RunOptions, Stage
from lymph_cv.workdir.layout import BAG_FOLDS_JSON, BAGS_JSON, MANIFEST_NAME, PATCH_DIR

#: The data source whose files key patient bags (stages/sources/patients.py).
PATIENT_SOURCE = "bags"


class BagsStage(Stage):
    """The bags of a MIL run and their splits by patient (k folds, seeded)."""

    name = "bags"
    reads = ("DATA/<patient>/*", f"{PATCH_DIR}/{MANIFEST_NAME}")
    writes = (BAGS_JSON, BAG_FOLDS_JSON, "bags_train_K.txt", "bags_test_K.txt")

    def enabled(self, o: RunOptions) -> bool:
        return o.mil is not None

    def check(self, o: RunOptions) -> None:
        if o.bag != PATIENT_BAGS and o.bag not in PATCH_BAG_KINDS:
            raise ConfigError(f"--bag {o.bag!r}", valid=(PATIENT_BAGS, *PATCH_BAG_KINDS))
        if o.clinical is not None and o.bag != PATIENT_BAGS:
            raise ConfigError("--clinical: clinical attributes come with patient bags (DATA/<patient>/), not "
                              f"--bag {o.bag}")
        if o.fusion is not None and o.bag != PATIENT_BAGS:
            raise ConfigError(f"--fusion: --bag {o.bag} bags have no clinical attributes")

    def params(self, o: RunOptions) -> dict:
        clinical = None if o.clinical is None else o.where(o.clinical)
        return {"bag": o.bag, "data": o.where(o.data_dir), "classes": list(o.classes), "clinical": clinical,
                "k": o.k, "seed": o.seed}

    def fingerprint(self, o: RunOptions) -> str:
        # image and case bags chain to the patches stage's key, which covers the images
        return input_fingerprint(o.data_dir, o.classes, PATIENT_SOURCE) if o.bag == PATIENT_BAGS else ""

    def complete(self, o: RunOptions) -> bool:
        return all((Path(o.workdir) / name).is_file() for name in (BAGS_JSON, BAG_FOLDS_JSON))

    def run(self, o: RunOptions, fresh: bool) -> None:
        workdir = Path(o.workdir)
        if o.bag == PATIENT_BAGS:
            bag_set = load_bags(o.data_dir, clinical=o.clinical, classes=o.classes)
        else:
            bag_set = bags_from_patches(workdir / PATCH_DIR / MANIFEST_NAME, o.bag)
        write_bags(workdir, bag_set)
        split_bags(bag_set, workdir, method="kfold", k=o.k, seed=o.seed)


STAGE = BagsStage()
