"""Accuracy on MovieLens 100K's five folds with the default settings.

For each fold N: ingest uN.base and uN.test, train on uN.base with defaults, score uN.test.
Prints the RMSE and MAE per fold, the time each fold takes, and the mean over the folds.

    python tests/bench/bench_quality_ml100k.py [ML100K_DIR]   (or $MFPIPE_ML100K)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cluster import connect
from pipeline.config import TrainConfig
from pipeline.evaluate import evaluate
from pipeline.ingest import ingest
from pipeline.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=os.environ.get("MFPIPE_ML100K"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folds", default="1,2,3,4,5")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting, e.g. --set rank=32 (to compare against the defaults)",
    )
    args = parser.parse_args()
    if not args.data:
        parser.error("give the ml-100k folder as an argument or in $MFPIPE_ML100K")
    logging.basicConfig(level=logging.WARNING)
    folder = Path(args.data)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = TrainConfig.from_mapping(overrides, where="--set")
    print(f"settings: {config.to_dict()}")
    rows = []
    with connect(None, args.workers) as client, tempfile.TemporaryDirectory() as tmp:
        for fold in [int(f) for f in args.folds.split(",")]:
            t0 = time.perf_counter()
            base = ingest(folder / f"u{fold}.base", Path(tmp) / f"u{fold}.base", client)
            test = ingest(folder / f"u{fold}.test", Path(tmp) / f"u{fold}.test", client)
            t1 = time.perf_counter()
            result = train(base, config, client, progress=False)
            t2 = time.perf_counter()
            scores = evaluate(result.model, test, client)
            t3 = time.perf_counter()
            meta = result.model.metadata
            rows.append((scores["rmse"], scores["mae"]))
            print(
                f"u{fold}: RMSE {scores['rmse']:.4f}  MAE {scores['mae']:.4f}  "
                f"best epoch {meta['best_epoch']}  epochs {meta['epochs_run']}+"
                f"{meta['refit_epochs']}  ingest {t1 - t0:.1f} s  train {t2 - t1:.1f} s  "
                f"evaluate {t3 - t2:.1f} s",
                flush=True,
            )
    rmse, mae = np.mean(rows, axis=0)
    print(f"mean over {len(rows)} folds: RMSE {rmse:.4f}  MAE {mae:.4f}")


if __name__ == "__main__":
    main()
