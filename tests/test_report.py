"""`sweep report`: the HTML is self-contained, parses, has every section and chart; Markdown has the same tables.
When chromium is installed, the HTML is rendered headless and every chart must lay out with visible marks."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sweeper.errors import UserError
from sweeper.report import SECTIONS, write_report
from test_analysis import build_results

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "source", "wbr"}
SVG_VOID = {"rect", "line", "circle", "polyline", "path"}  # self-closed or explicitly closed, both fine


class _Checker(HTMLParser):
    """Collects sections, charts and their marks, and checks tags are balanced."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: list[str] = []
        self.charts: dict[str, dict[str, int]] = {}
        self._chart: str | None = None
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            v = a.get(k)
            if v and not v.startswith("#"):
                self.external.append(f"{tag} {k}={v}")
        if tag in ("script", "link", "iframe", "img"):
            self.external.append(tag)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "svg":
            self._chart = a.get("data-chart", "?")
            self.charts[self._chart] = {}
        elif self._chart:
            self.charts[self._chart][tag] = self.charts[self._chart].get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag == "svg":
            self._chart = None
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
            return
        self.stack.pop()


@pytest.fixture(scope="module")
def rdir(tmp_path_factory) -> str:
    return str(build_results(tmp_path_factory.mktemp("rep") / "hand"))


@pytest.fixture(scope="module")
def html_report(rdir, tmp_path_factory) -> Path:
    return write_report([rdir], tmp_path_factory.mktemp("out") / "report.html")


def test_html_parses_has_every_section_and_chart(html_report):
    text = html_report.read_text()
    p = _Checker()
    p.feed(text)
    p.close()
    assert not p.errors, p.errors[:5]
    assert p.stack == [], p.stack
    assert p.sections == [k for k, _ in SECTIONS]
    # self-contained: no scripts, no external references, no URLs at all
    assert p.external == []
    assert "http://" not in text and "https://" not in text and "url(" not in text
    expected = {"pareto-memory-m1", "pareto-throughput-m1", "speed-m1", "memory-m1", "kl-m1", "speed-m2",
                "memory-m2", "kl-m2"}
    assert expected <= set(p.charts), sorted(p.charts)
    # charts carry their marks: 4 points per m1 Pareto plot + a front line; bars; heat-map cells
    assert p.charts["pareto-memory-m1"].get("circle") == 4 and p.charts["pareto-memory-m1"].get("polyline") == 1
    assert p.charts["pareto-throughput-m1"].get("circle") == 4
    assert p.charts["speed-m1"].get("rect", 0) >= 4 * 4  # 4 trials x 4 speedups (+ legend)
    assert p.charts["kl-m1"].get("rect") == 3 * 3  # int8, nf4, fp4/fp16 x 3 prompt categories


def test_html_content(html_report):
    text = html_report.read_text()
    # summary in the seeds' style: each metric with its vs-baseline column, baseline marked
    for s in ("Decode vs base", "Weights vs base", "arc_easy vs base", "PPL vs base", "0.50x", "-75.0%",
              "<td>baseline</td>", "no baseline (missing)", "Decode kernel vs base", "1.50x", "1.60x"):
        assert s in text, s
    assert "Footprint" not in text  # get_memory_footprint() is no memory column, chart or label
    # speed in both kinds: the chart's legend names them, one sentence says which is host-bound, and the int8 trial
    # without a kernel-level number says why (its row's graph_decode_error)
    speed = text[text.index('<section id="speed">'):text.index('<section id="memory">')]
    assert "decode eager" in speed and "decode kernel-level" in speed and "host-bound" in speed
    assert "int8/fp16: no kernel-level decode (not attempted: bitsandbytes LLM.int8" in speed
    assert "weights GB" in text[text.index('<section id="memory">'):]
    assert "-10.0% (worse)" in text and "-2.5% (noise)" in text  # nf4 / int8 on arc_easy, verdicts from the samples
    assert "within noise" in text and '<td class="v-worse">worse</td>' in text  # the significance table's verdict
    assert "CUDA out of memory" in text and "OutOfMemoryError" in text  # failed trial with its reason
    assert "torch_version" in text and "2.13.0" in text  # environment
    assert "Highest throughput within 1% retention loss" in text


def test_markdown_has_the_same_tables(rdir, tmp_path):
    out = write_report([rdir], tmp_path / "r.md", fmt="markdown")
    md = out.read_text()
    for _, title in SECTIONS:
        assert f"## {title}" in md
    assert "| int8 | fp16 |" in md and "Decode vs base" in md and "| worse |" in md
    assert "CUDA out of memory" in md
    assert "<svg" not in md


def test_bad_format_and_output(rdir, tmp_path):
    with pytest.raises(UserError, match="pdf"):
        write_report([rdir], tmp_path / "x.pdf", fmt="pdf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        write_report([rdir], tmp_path / "file" / "sub" / "r.html")


def test_report_of_empty_and_failed_only_dirs(tmp_path):
    from sweeper.store import ResultsStore
    from test_analysis import _trial_row

    ResultsStore(tmp_path / "f").write_trial(_trial_row("F", status="failed", error_stage="load", error="boom"), [])
    out = write_report([str(tmp_path / "f")], tmp_path / "f.html")
    assert "boom" in out.read_text()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


RENDER_CHECK = """<script>
const out = [];
for (const svg of document.querySelectorAll('svg.chart')) {
  const r = svg.getBoundingClientRect();
  let marks = 0;
  for (const el of svg.querySelectorAll('circle,rect.bar,rect.cell,polyline')) {
    const b = el.getBoundingClientRect();
    if (b.width > 0 && b.height > 0) marks++;
  }
  out.push({chart: svg.dataset.chart, w: r.width, h: r.height, marks: marks});
}
const pre = document.createElement('pre'); pre.id = 'render-check'; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def test_chromium_renders_every_chart(html_report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); the parse test above still ran")
    page = tmp_path / "check.html"
    page.write_text(html_report.read_text().replace("</body>", RENDER_CHECK + "</body>"))
    env = dict(os.environ, HOME=str(tmp_path))
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', proc.stdout, flags=re.S)
    assert m, f"chromium produced no render check (rc {proc.returncode}): {proc.stderr[-2000:]}"
    charts = {c["chart"]: c for c in json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))}
    assert {"pareto-memory-m1", "pareto-throughput-m1", "speed-m1", "memory-m1", "kl-m1"} <= set(charts)
    for name, c in charts.items():
        assert c["w"] > 100 and c["h"] > 100, (name, c)
        if name.endswith("-m1"):
            assert c["marks"] > 0, (name, c)
    assert charts["pareto-memory-m1"]["marks"] == 4 + 1  # 4 points and the front line
