"""`sweep status`: what a study's results dir holds: done / failed / pending counts and every failure."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .store import ResultsStore


def _resolve(study_or_dir: str, results_dir: str | None = None) -> tuple[ResultsStore, list[dict]]:
    p = Path(study_or_dir)
    if p.is_file() and p.suffix == ".py":
        from .launch import default_results_dir
        from .studyfile import load_study_file
        from .trials import expand

        study = load_study_file(p)
        store = ResultsStore(results_dir or default_results_dir(study))
        trials, _ = expand(study)
        expected = [{"trial_id": t.trial_id, "model": t.model.name, "precision": t.precision,
                     "compute_dtype": t.compute_dtype} for t in trials]
        return store, expected
    store = ResultsStore(p)
    doc = store.read_study()
    if doc is None:
        raise UserError(f"{study_or_dir} is neither a study file (.py) nor a results dir with study.json")
    return store, doc.get("trials", [])


def status_report(study_or_dir: str, results_dir: str | None = None) -> str:
    store, expected = _resolve(study_or_dir, results_dir)
    status = store.trial_status()
    ids = [t["trial_id"] for t in expected]
    done = [i for i in ids if status.get(i) == "done"]
    failed = [t for t in expected if status.get(t["trial_id"]) == "failed"]
    from .lock import lock_holder

    lock = lock_holder(store.root) is not None
    lines = [f"{store.root}: {len(ids)} trials: {len(done)} done, {len(failed)} failed, "
             f"{len(ids) - len(done) - len(failed)} pending" + (" (a launch holds the lock: running)" if lock else "")]
    rows = store.read_trial_rows(t["trial_id"] for t in failed)
    for t in failed:
        row = rows.get(t["trial_id"], {})
        lines.append(f"  FAILED {t['trial_id']} {t['model']} {t['precision']}/{t['compute_dtype']}: "
                     f"stage {row.get('error_stage')}, {row.get('error_type')}: {row.get('error')}")
    return "\n".join(lines)
