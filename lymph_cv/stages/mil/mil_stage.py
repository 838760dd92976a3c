"""``run --mil METHOD``: train and evaluate the MIL model of every bag split (``WORKDIR/mil/NAME/K/``,
pooled figures in ``WORKDIR/mil/NAME/mil_metrics.json``), as ``lymph-cv mil train`` does."""
from __future__ import annotations

from lymph_cv.core.devices import resolve_device
from lymph_cv.stages.mil.evaluate import METRICS_JSON
from lymph_cv.stages.mil.folds import fold_done, mil_dir, run_name, train_folds
from lymph_cv.stages.mil.train import MILConfig
from lymph_cv.errors import ConfigError
from lymph_cv.stages.stage import LOCAL_EXECUTOR, RunOptions, Stage
from lymph_cv.workdir.records import read_cache


def run_config(o: RunOptions) -> MILConfig:
    """The MIL configuration of a run: method, fusion, --arch, --seed and the --mil-set settings."""
    return MILConfig.from_pairs(dict(o.mil_params), method=o.mil, fusion=o.fusion, arch=o.arch, seed=o.seed)


class MILStage(Stage):
    """Per split: train on its training bags, evaluate on its test bags."""

    name = "mil"
    reads = ("bags.json", "bags_train_K.txt", "bags_test_K.txt")
    writes = ("mil/NAME/{fold}/", f"mil/NAME/{METRICS_JSON}")
    per_fold = True

    def enabled(self, o: RunOptions) -> bool:
        return o.mil is not None

    def check(self, o: RunOptions) -> None:
        if o.executor != LOCAL_EXECUTOR:
            raise ConfigError(f"--executor {o.executor}: MIL splits train in this process (use --executor local, "
                              "or submit `lymph-cv mil train WORKDIR --folds K` yourself)")
        run_config(o)

    def params(self, o: RunOptions) -> dict:
        return {"config": run_config(o).to_json(), "device": o.device, "folds": o.fold_list}

    def complete(self, o: RunOptions) -> bool:
        config = run_config(o)
        base = mil_dir(o.workdir, run_name(config))
        return (base / METRICS_JSON).is_file() and all(fold_done(base / str(k), config) for k in o.fold_list)

    def run(self, o: RunOptions, fresh: bool) -> dict:
        return train_folds(o.workdir, run_config(o), folds=o.fold_list, device=str(resolve_device(o.device)),
                           redo=fresh)

    def result(self, o: RunOptions) -> dict:
        return read_cache(mil_dir(o.workdir, run_name(run_config(o))) / METRICS_JSON)


STAGE = MILStage()
