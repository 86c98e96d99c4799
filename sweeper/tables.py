"""Rendering a Polars DataFrame for the terminal or a file: table | csv | json | markdown."""
from __future__ import annotations

import polars as pl

FORMATS = ("table", "csv", "json", "markdown")


def _rounded(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col(pl.Float64, pl.Float32).round_sig_figs(4))


def render(df: pl.DataFrame, fmt: str = "table") -> str:
    if fmt == "csv":
        return df.write_csv()
    if fmt == "json":
        return df.write_json()
    if fmt == "markdown":
        return markdown(_rounded(df))
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=10_000, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True, fmt_str_lengths=60, tbl_formatting="ASCII_MARKDOWN"):
        return str(_rounded(df)) + "\n"


def markdown(df: pl.DataFrame) -> str:
    def cell(v) -> str:
        return "" if v is None else str(v).replace("|", "\\|")

    head = "| " + " | ".join(df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.iter_rows()]
    return "\n".join([head, sep, *rows]) + "\n"
