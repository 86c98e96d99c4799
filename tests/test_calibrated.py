"""Calibrated AWQ int4 (awq4): calibrated once per identity on local text, cached under the results store, reused.

Real torchao AWQ on CPU over a tiny Llama, calibrating on WikiText-2 *valid* (perplexity uses *test*).
"""
from __future__ import annotations

import json

import polars as pl
import pytest

from helpers import read_metrics, read_trials, sweep, write_study

pytest.importorskip("torchao")

# Small calibration so the test stays fast on 2 cores; the defaults are 16 x 512 tokens and 20 scales.
OPTS = {"awq4": {"group_size": 64, "calib_samples": 2, "calib_seq_len": 64, "scale_search": 4}}


def _study(path, name, model, data, new_tokens: int, compute_dtypes=("fp32",)):
    return write_study(path, f"""
        study = Study(
            name={name!r},
            models=[{str(model)!r}],
            precisions=["awq4"],
            compute_dtypes={list(compute_dtypes)!r},
            precision_options={OPTS!r},
            benchmark=Benchmark(prompt_tokens=16, new_tokens={new_tokens}, batch_sizes=(1,), repeats=1, warmup=0),
            perplexity=Perplexity({str(data / "wikitext-2" / "test.txt")!r}, context=64, max_tokens=128),
            kl=False,
        )
    """)


def _awq_load_metrics(results) -> list[dict]:
    trials = read_trials(results).filter(pl.col("precision") == "awq4")
    m = read_metrics(results).filter(pl.col("stage") == "load")
    rows = []
    for tid, status in zip(trials["trial_id"], trials["status"]):
        assert status == "done", read_trials(results).filter(pl.col("trial_id") == tid)["error"].to_list()
        mm = m.filter(pl.col("trial_id") == tid)
        rows.append({**dict(zip(mm["metric"], mm["value"])), "trial_id": tid})
    return rows


def test_awq_checkpoint_is_calibrated_once_and_reused(tmp_path, tiny_model, shared_data):
    res_a = tmp_path / "res-a"
    first = sweep("launch", str(_study(tmp_path / "a.py", "calib", tiny_model, shared_data, 4)), "--results", str(res_a))
    assert first.returncode == 0, first.stdout + first.stderr
    (m1,) = _awq_load_metrics(res_a)
    assert m1["calibration_cache_hit"] == 0 and m1["calibration_s"] > 0 and m1["calibration_tokens"] == 128
    ckpts = [p for p in (res_a / "quantized").iterdir() if not p.name.startswith(".")]
    assert len(ckpts) == 1 and (ckpts[0] / "weights.pt").is_file()
    meta = json.loads((ckpts[0] / "meta.json").read_text())
    assert meta["calibration_file"].endswith("valid.txt") and meta["group_size"] == 64
    mtime = (ckpts[0] / "weights.pt").stat().st_mtime_ns
    # the model's own report counts torchao's int4 weights at full size; the stored bytes are the packed ones
    assert m1["weights_bytes"] < m1["footprint_bytes"] * 0.8

    # Another study (other name, benchmark settings, so other trial ids) and results dir, sharing the cache folder:
    # the checkpoint is found by identity and reused, not recalibrated.
    res_b = tmp_path / "res-b"
    second = sweep("launch", str(_study(tmp_path / "b.py", "other", tiny_model, shared_data, 6)), "--results",
                  str(res_b), env={"SWEEPER_QUANTIZED_CACHE": str(res_a / "quantized")})
    assert second.returncode == 0, second.stdout + second.stderr
    (m3,) = _awq_load_metrics(res_b)
    assert m3["calibration_cache_hit"] == 1 and m3["calibration_s"] == 0
    assert m3["trial_id"] != m1["trial_id"]
    assert (ckpts[0] / "weights.pt").stat().st_mtime_ns == mtime
    assert len([p for p in (res_a / "quantized").iterdir() if not p.name.startswith(".")]) == 1
    assert not (res_b / "quantized").exists()


def test_checkpoint_identity_follows_what_changes_the_weights(tmp_path, tiny_model, shared_data):
    from sweeper import Study, precisions
    from sweeper.quantize import calibrated
    from sweeper.trials import expand

    def key(opts: dict, cd: str = "fp32") -> str:
        study = Study(name="k", models=[str(tiny_model)], precisions=["fp32", "awq4"], compute_dtypes=[cd],
                      precision_options={"awq4": opts})
        spec = next(t for t in expand(study)[0] if t.precision == "awq4")
        return calibrated.key_of(calibrated.identity(spec, precisions.get("awq4").resolve_options(opts), "cpu"))

    base = key(OPTS["awq4"])
    assert key(OPTS["awq4"]) == base
    assert key({**OPTS["awq4"], "group_size": 32}) != base
    assert key({**OPTS["awq4"], "calib_samples": 3}) != base
    assert key(OPTS["awq4"], "bf16") != base
    other = tmp_path / "calib.txt"  # the same text under another path: same weights, same checkpoint
    other.write_bytes(calibrated.calibration_file(OPTS["awq4"]).read_bytes())
    assert key({**OPTS["awq4"], "calib_data": str(other)}) == base
    other.write_text(other.read_text() + " changed")
    assert key({**OPTS["awq4"], "calib_data": str(other)}) != base
    with pytest.raises(FileNotFoundError, match="calib_data"):
        key({**OPTS["awq4"], "calib_data": str(tmp_path / "missing.txt")})
