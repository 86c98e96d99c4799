"""Loading a study file: trusted Python code that defines a module-level ``study = Study(...)``.

Relative paths in a study (local model folders starting with ``./``, ``../``, ``/`` or ``~``, perplexity text, task
data, a calibrated precision's ``calib_data``) are resolved against the study file's folder, so a study runs the same
from any working directory.
"""
from __future__ import annotations

import dataclasses
import os
import runpy
import traceback
from pathlib import Path

from .errors import UserError
from .study import Model, Perplexity, Study, Task


def is_local_model_id(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~"))


def _resolve(base: Path, p: str) -> str:
    path = Path(os.path.expanduser(p))
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_paths(study: Study, base: Path, source: str) -> Study:
    models = []
    for m in study.models:
        if is_local_model_id(m.id):
            resolved = _resolve(base, m.id)
            if not Path(resolved).is_dir():
                raise UserError(f"{source}: model folder {m.id!r} does not exist (resolved to {resolved}); "
                                "give a hub id or an existing local folder")
            m = dataclasses.replace(m, id=resolved, label=m.label or Path(resolved).name)
        models.append(m)
    ppl = study.perplexity
    if ppl is not None:
        resolved = _resolve(base, ppl.path)
        if not Path(resolved).is_file():
            raise UserError(f"{source}: perplexity text file {ppl.path!r} does not exist (resolved to {resolved}); "
                            "give a UTF-8 text file such as WikiText-2's test.txt")
        ppl = dataclasses.replace(ppl, path=resolved)
    tasks = []
    for t in study.tasks:
        if isinstance(t.data, str):
            t = dataclasses.replace(t, data=_resolve(base, t.data))
        elif isinstance(t.data, dict):
            t = dataclasses.replace(t, data={k: _resolve(base, v) for k, v in t.data.items()})
        tasks.append(t)
    options = {p: ({**o, "calib_data": _resolve(base, o["calib_data"])} if isinstance(o.get("calib_data"), str) else o)
               for p, o in study.precision_options.items()}
    return dataclasses.replace(study, models=tuple(models), perplexity=ppl, tasks=tuple(tasks),
                               precision_options=options)


def load_study_file(path: str | os.PathLike) -> Study:
    """Run a study file and return its validated, path-resolved ``study``; UserError (one line) on any problem."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        what = "a results dir" if (path / "study.json").is_file() else "a directory"
        raise UserError(f"{source} is {what}, not a study file; give the .py file that defines `study = Study(...)`")
    if not path.is_file():
        raise UserError(f"study file {source} does not exist; give the path of a .py file that defines `study = Study(...)`")
    if path.suffix != ".py":
        raise UserError(f"{source} is not a study file (a .py file that defines `study = Study(...)`, such as "
                        "studies/demo.py)")
    # the study file's own error is chained (`from e`): --debug shows its traceback
    try:
        namespace = runpy.run_path(str(path), run_name="__sweeper_study__")
    except UserError as e:
        raise UserError(f"{source}: {e}") from e
    except SyntaxError as e:
        raise UserError(f"{source}: syntax error at line {e.lineno}: {e.msg}; the study file must be valid Python") from e
    except Exception as e:  # the study file's own code raised
        tb = traceback.extract_tb(e.__traceback__)
        line = next((f.lineno for f in reversed(tb) if f.filename == str(path)), None)
        where = f" at line {line}" if line else ""
        raise UserError(f"{source}: running the study file failed{where}: {type(e).__name__}: {e}") from e
    if "study" not in namespace:
        raise UserError(f"{source}: defines no module-level `study`; add `study = Study(name=..., models=[...], precisions=[...])`")
    study = namespace["study"]
    if not isinstance(study, Study):
        raise UserError(f"{source}: `study` must be a sweeper.Study, got {type(study).__name__}")
    return resolve_paths(study, path.resolve().parent, source)


__all__ = ["load_study_file", "Model", "Perplexity", "Task"]
