"""Where a calibrated precision's calibration text is (sweeper/quantize/calibrated.py): its ``calib_data`` option, else
``SWEEPER_CALIB_DATA``, else WikiText-2's validation split. Apart from the quantizer, so that a trial's identity
(sweeper/trials.py) can fingerprint the text without importing the quantizer."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CALIB_ENV = "SWEEPER_CALIB_DATA"
# WikiText-2 validation split (the test split is what perplexity is measured on): the workspace's full copy, else the
# first articles the project ships in demo/data (10,794 llama-4m tokens: more than the default 16 x 512).
_REPO = Path(__file__).resolve().parents[1]
_DEFAULT_CALIB = next((p for p in (_REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt",
                                   _REPO / "demo" / "data" / "wikitext-2" / "valid.txt") if p.is_file()),
                      _REPO / "demo" / "data" / "wikitext-2" / "valid.txt")


def calibration_file(opts: dict[str, Any]) -> Path:
    path = Path(opts.get("calib_data") or os.environ.get(CALIB_ENV) or _DEFAULT_CALIB).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {str(path)!r} does not exist: set the precision option calib_data "
                                f"or {CALIB_ENV} to a plain-text file (e.g. WikiText-2 valid.txt)")
    return path
