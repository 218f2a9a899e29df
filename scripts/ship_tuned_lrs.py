"""Ship the learning rates of a tuning sweep: write geolora/bench/tuned_lrs.json.

Usage:
    python scripts/ship_tuned_lrs.py RESULTS_DIR [RESULTS_DIR ...]

Each RESULTS_DIR is the ``--out`` of a ``geolora bench --tune`` run; its results.json gives,
per optimizer tuned in that sweep, the chosen lr and the validation metric over the grid. The
entry of a task also records the command, the versions, the sweep signature and the study
file (``RESULTS_DIR/study.db``, relative to the repository) that hold every run. ``geolora
bench`` without ``--tune`` then runs only the seeds at these rates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "geolora" / "bench" / "tuned_lrs.json"


def entry(results_dir: Path) -> tuple[str, dict]:
    s = json.loads((results_dir / "results.json").read_text())["summary"]
    opts = {
        r["optimizer"]: {
            "lr_chosen": r["lr_chosen"],
            "lr_grid": r["lr_grid"],
            # the bench uses a shipped lr only under this same configuration
            "config": s["optimizer_configs"][r["optimizer"]],
        }
        for r in s["rows"]
        if r["lr_chosen"] is not None and r["lr_source"] == "tuned in this sweep"
    }
    study = (results_dir / "study.db").resolve()
    try:
        study_ref = str(study.relative_to(ROOT))
    except ValueError:
        study_ref = str(study)
    return s["task"], {
        "rank": s["rank"],
        "steps": s["steps"],
        "signature": s["signature"],
        "command": s["command"],
        "study": study_ref,
        "versions": s["versions"],
        "protocol": s["protocol"],
        "optimizers": opts,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results_dir", type=Path, nargs="+")
    a = p.parse_args()
    data = json.loads(TARGET.read_text()) if TARGET.is_file() else {}
    for d in a.results_dir:
        task, e = entry(d)
        old = data.get(task, {})
        if old.get("signature") == e["signature"]:  # same settings: keep optimizers tuned earlier
            e["optimizers"] = {**old.get("optimizers", {}), **e["optimizers"]}
        data[task] = e
        chosen = ", ".join(f"{k} {v['lr_chosen']:.3g}" for k, v in e["optimizers"].items())
        print(f"{task}: {chosen}")
    TARGET.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
