"""How this folder was made (run from the repository root, with ../shared/data present):
``python demo/build.py /work/shared/data``. It writes demo/data/: llama-4m saved in fp16 and the first articles of
the WikiText-2 / PIQA / GSM8K files, so that the demo and the test suite run from a bare clone (see demo/README.md)."""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data")
OUT = Path(__file__).resolve().parent / "data"
WIKI_PAGES = {"test.txt": 10, "valid.txt": 4}  # whole articles from the start of each split
PIQA_ROWS, GSM8K_ROWS = 200, 100


def first_pages(lines: list[str], n: int) -> list[str]:
    starts = [i for i, line in enumerate(lines) if line.startswith(" = ") and not line.startswith(" = = ")]
    return lines[:starts[n]] if len(starts) > n else lines


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    model_out = OUT / "models" / "llama-4m"
    model = AutoModelForCausalLM.from_pretrained(SRC / "models" / "llama-4m", dtype=torch.float32)
    model.to(torch.float16).save_pretrained(model_out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SRC / "models" / "llama-4m" / f, model_out / f)
    (OUT / "wikitext-2").mkdir(parents=True)
    for name, n in WIKI_PAGES.items():
        lines = (SRC / "wikitext-2" / name).read_text().split("\n")
        (OUT / "wikitext-2" / name).write_text("\n".join(first_pages(lines, n)) + "\n")
    (OUT / "piqa").mkdir()
    rows = (SRC / "piqa" / "valid.jsonl").read_text().splitlines()[:PIQA_ROWS]
    (OUT / "piqa" / "valid.jsonl").write_text("\n".join(rows) + "\n")
    labels = (SRC / "piqa" / "valid-labels.lst").read_text().split()[:PIQA_ROWS]
    (OUT / "piqa" / "valid-labels.lst").write_text("\n".join(labels) + "\n")
    shutil.copy(SRC / "piqa" / "README.md", OUT / "piqa" / "README.md")
    (OUT / "gsm8k").mkdir()
    rows = (SRC / "gsm8k" / "test.jsonl").read_text().splitlines()[:GSM8K_ROWS]
    assert all("####" in json.loads(r)["answer"] for r in rows)
    (OUT / "gsm8k" / "test.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copy(SRC / "gsm8k" / "LICENSE", OUT / "gsm8k" / "LICENSE")


if __name__ == "__main__":
    main()
