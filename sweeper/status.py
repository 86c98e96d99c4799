"""`sweep status`: what a study's results dir holds: done / failed / pending counts and every failure.

With a study file it counts the trials a `sweep launch` with the same options (--results, --only, --limit) would
run, and says what else the folder holds (trials of other --only / --limit selections, whose ids differ); with a
results dir it counts every trial launched into it."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .store import ResultsStore


def _resolve(study_or_dir: str, results_dir: str | None = None, only: tuple[str, ...] = (),
             limit: float | None = None) -> tuple[ResultsStore, list[dict], str]:
    from .location import is_uri

    p = Path(study_or_dir)
    if not is_uri(study_or_dir) and (p.suffix == ".py" or p.is_file()):
        from .launch import apply_overrides, check_same_study, default_results_dir, narrow, parse_only
        from .studyfile import load_study_file
        from .trials import expand

        study = load_study_file(p)
        study, _ = apply_overrides(study, limit, None, None)
        store = ResultsStore(results_dir or default_results_dir(study))
        check_same_study(store, study)
        trials, _ = expand(study)
        if only:
            trials = narrow(trials, parse_only(only))
        expected = [{"trial_id": t.trial_id, "model": t.model.name, "precision": t.precision,
                     "compute_dtype": t.compute_dtype} for t in trials]
        return store, expected, f"study {study.name}"
    if only or limit is not None or results_dir:
        raise UserError("--results, --only and --limit go with a study file (`sweep status STUDY.py --only ...`), "
                        f"not with a results dir such as {study_or_dir}")
    if is_uri(study_or_dir):
        p = study_or_dir  # an object store location: read as it is
    elif not p.exists():
        raise UserError(f"{study_or_dir} does not exist; give a study file (.py) or a results dir that `sweep launch` "
                        "wrote")
    store = ResultsStore(p)
    doc = store.read_study()
    if doc is None:
        raise UserError(f"{study_or_dir} is neither a study file (.py) nor a results dir with study.json")
    return store, doc.get("trials", []), "launched here"


def status_report(study_or_dir: str, results_dir: str | None = None, only: tuple[str, ...] = (),
                  limit: float | None = None) -> str:
    store, expected, what = _resolve(study_or_dir, results_dir, only, limit)
    status = store.trial_status()
    ids = [t["trial_id"] for t in expected]
    done = [i for i in ids if status.get(i) == "done"]
    failed = [t for t in expected if status.get(t["trial_id"]) == "failed"]
    from .lock import lock_holder

    lock = lock_holder(store.root) is not None
    lines = [f"{store.root}: {len(ids)} trials: {len(done)} done, {len(failed)} failed, "
             f"{len(ids) - len(done) - len(failed)} pending ({what})"
             + ((" (a launch holds the lease: running, or killed without releasing it)" if store.remote else
                 " (a launch holds the lock: running)") if lock else "")]
    rows = store.read_trial_rows(t["trial_id"] for t in failed)
    for t in failed:
        row = rows.get(t["trial_id"], {})
        lines.append(f"  FAILED {t['trial_id']} {t['model']} {t['precision']}/{t['compute_dtype']}: "
                     f"stage {row.get('error_stage')}, {row.get('error_type')}: {row.get('error')}")
    listed = set(ids)  # once: a set built per row made this quadratic (minutes at 100k trials)
    others = [s for i, s in status.items() if i not in listed]
    if others:  # rows of another selection (--only / --limit: a limit changes the trial ids), never silently
        lines.append(f"  the folder also holds {len(others)} other trial(s) ({others.count('done')} done, "
                     f"{others.count('failed')} failed) of other --only / --limit options; "
                     f"`sweep status {store.root}` lists every trial launched there")
    return "\n".join(lines)
