"""The tuner's section (`Report.tune`) in report.md and report.html: the overview, each backend's ladder as a table,
the Pareto plot, escaping of names from report.json, and a report.json round trip."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from int8eval.config import Preprocessing
from int8eval.report import plots, render
from int8eval.report.html import render_html
from int8eval.report.markdown import render_markdown
from int8eval.report.schema import DataSection, ModelSection, Report, VariantResult
from int8eval.report.tune import LADDER_HEADER, budget_pts, pareto_points

HOSTILE = "a|b<script>alert(1)</script>"


def _paired(diff: float, lo: float, hi: float, agreement: float, n: int = 300) -> dict:
    return {
        "n": n, "ci_method": "newcombe", "test": "mcnemar_exact",
        "top1": {"ref": 0.8, "var": 0.8 + diff, "diff": diff, "diff_ci95": [lo, hi], "both_right": 230,
                 "ref_right_var_wrong": 5, "ref_wrong_var_right": 3, "both_wrong": 62, "mcnemar_p": 0.7},
        "agreement_top1": agreement, "agreement_top1_ci95": [agreement - 0.01, min(1.0, agreement + 0.005)],
    }


def _verdict(word: str, drop: float, lo: float, hi: float, budget: float = 0.01) -> dict:
    return {"verdict": word, "reason": f"drop {drop}", "budget": budget, "drop": drop, "drop_ci95": [lo, hi],
            "criterion": "ci_upper_le_budget"}


def _candidate(backend: str, step: str, name: str, **kw) -> dict:
    return {"backend": backend, "step": step, "name": name, "recipe": {"calib": "minmax"}, "status": "ok", **kw}


def tune_section(ort_throughput: tuple[float, float] = (300.0, 420.0)) -> dict:
    """Two backends: onnxruntime climbs three steps (a failed default, a percentile one that passes tuning but fails
    confirmation, one with FP32 layers that is confirmed and chosen); openvino has an error and a hostile name."""
    t1, t2 = ort_throughput
    return {
        "objective": "throughput",
        "budget": {"max_drop": 1.0, "drop": "absolute", "description": "top-1 drop of at most 1 point"},
        "rule": "accept when the upper end of the paired 95% CI of the drop is within 1 point; then confirm",
        "sets": {"calibration": 100, "tuning": 300, "confirmation": 400, "confirmation_source": "seeded split of DIR",
                 "tuning_ids": [f"t{i}.JPEG" for i in range(3)], "confirmation_ids": [f"c{i}.JPEG" for i in range(3)]},
        "candidates": [
            _candidate("onnxruntime", "default", "ort-int8-minmax", tuning=_paired(-0.03, -0.05, -0.01, 0.95),
                       tuning_verdict=_verdict("fail", 0.03, 0.01, 0.05), latency_ms=2.5, throughput_ips=t1,
                       speedup_vs_fp32=t1 / 100, size_mb=5.1, size_vs_fp32=0.27, build_s=3.0, time_s=8.2),
            _candidate("onnxruntime", "calibration", "ort-int8-pct", tuning=_paired(-0.002, -0.007, 0.003, 0.99),
                       tuning_verdict=_verdict("pass", 0.002, -0.003, 0.007), accepted=True, accepted_by="verdict",
                       confirmation=_paired(-0.015, -0.025, -0.005, 0.97, n=400),
                       confirmation_verdict=_verdict("fail", 0.015, 0.005, 0.025), confirmed=False,
                       latency_ms=2.4, throughput_ips=t1 * 1.05, speedup_vs_fp32=3.15, size_mb=5.1, size_vs_fp32=0.27,
                       time_s=9.0),
            _candidate("onnxruntime", "FP32 layers", "ort-int8-pct-keep2", tuning=_paired(0.0, -0.004, 0.004, 0.995),
                       tuning_verdict=_verdict("pass", 0.0, -0.004, 0.004), accepted=True, accepted_by="verdict",
                       confirmation=_paired(-0.0025, -0.007, 0.002, 0.9925, n=400),
                       confirmation_verdict=_verdict("pass", 0.0025, -0.002, 0.007), confirmed=True,
                       latency_ms=3.0, throughput_ips=t2, speedup_vs_fp32=t2 / 100, size_mb=5.6, size_vs_fp32=0.3,
                       time_s=12.5),
            _candidate("openvino", "default", "ov-int8", status="error", error="RuntimeError: <boom> | pipe",
                       time_s=1.0),
            _candidate("openvino", "calibration", HOSTILE, tuning=_paired(-0.01, -0.02, 0.0, 0.98),
                       tuning_verdict=_verdict("inconclusive", 0.01, 0.0, 0.02), latency_ms=1.9, throughput_ips=500.0,
                       size_mb=4.9, size_vs_fp32=0.26, time_s=7.0),
            _candidate("openvino", "bias correction", "ov-int8-bc", tuning=_paired(-0.005, -0.01, 0.0, 0.985)),
        ],
        "backends": [
            {"backend": "onnxruntime", "fp32": "onnxruntime-fp32", "fp32_throughput_ips": 100.0, "fp32_size_mb": 18.9,
             "chosen": "ort-int8-pct-keep2", "stopped": "a candidate was confirmed",
             "pareto": ["ort-int8-pct", "ort-int8-pct-keep2"], "deploy": "deploy/onnxruntime"},
            {"backend": "openvino", "fp32": "openvino-fp32", "fp32_throughput_ips": 150.0, "fp32_size_mb": 18.8,
             "chosen": None, "stopped": "time budget spent", "pareto": [HOSTILE]},
        ],
        "choice": "ort-int8-pct-keep2",
        "choice_reason": "the fastest confirmed model: 4.20x the fastest FP32, 30% of its size",
    }


def make_report(tmp_path: Path, tune: dict | None = None) -> Report:
    variants = [VariantResult(name="torch-fp32", backend="torch", precision="fp32", status="ok", reference=True,
                              top1=0.8, size_mb=18.9),
                VariantResult(name="ort-int8-pct-keep2", backend="onnxruntime", precision="int8", status="ok",
                              top1=0.7975, size_mb=5.6)]
    report = Report(
        created="2026-01-01T00:00:00+00:00",
        model=ModelSection(name="tiny_test", source="random", num_params=1234,
                           preprocessing=Preprocessing(resize=40, crop=32)),
        data=DataSection(root=str(tmp_path), layout="folder-per-synset", num_found=800, num_images=400,
                         num_skipped=0),
        variants=variants,
        environment={"cpu": {"model": "test CPU", "logical_cores": 2, "isa": {"avx2": True}}, "gpu": None,
                     "libraries": {}},
        tune=tune,
    )
    return Report.model_validate(report.model_dump(mode="json"))  # as read back from report.json


def _ladder_tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Each backend's ladder table in report.md, as rows keyed by the header (cells split on unescaped pipes)."""
    tables, backend, header = {}, None, "| " + " | ".join(LADDER_HEADER) + " |"
    section = md.split("## Tuning", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith("### "):
            backend = line[4:]
        elif line.startswith("| ") and line != header:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert len(cells) == len(LADDER_HEADER), line
            tables.setdefault(backend, []).append(dict(zip(LADDER_HEADER, cells)))
    return tables


def test_markdown_has_the_overview_and_one_ladder_row_per_candidate(tmp_path):
    md = render_markdown(make_report(tmp_path, tune_section()))
    section = md.split("## Tuning", 1)[1].split("\n## ", 1)[0]
    assert "- Objective: throughput; budget: top-1 drop of at most 1 point" in section
    assert "- Stop rule: accept when the upper end of the paired 95% CI of the drop is within 1 point; then confirm" \
        in section
    assert "100 calibration, 300 tuning (candidates ranked and chosen), 400 confirmation images" in section
    assert "t0.JPEG" not in md and "c0.JPEG" not in md  # the ids stay in report.json
    assert "- Choice: `ort-int8-pct-keep2`: the fastest confirmed model: 4.20x the fastest FP32" in section
    assert "- FP32: `onnxruntime-fp32`, 100.0 images/s, 18.90 MB" in section
    assert "- Chosen: `ort-int8-pct-keep2`, deployed to `deploy/onnxruntime`" in section
    assert "- Chosen: none" in section and "- Stopped: time budget spent" in section

    tables = _ladder_tables(md)
    assert list(tables) == ["onnxruntime", "openvino"]
    ort = tables["onnxruntime"]
    assert [r["step"] for r in ort] == ["default", "calibration", "FP32 layers"]  # the ladder's order
    assert [r["★"] for r in ort] == ["", "★", "★"]
    refused, unconfirmed, chosen = ort
    assert refused["tuning verdict"] == "FAIL" and refused["accepted"] == "no" and refused["confirmed"] == "—"
    assert refused["tuning Δ top-1 pts [95% CI]"] == "-3.00 [-5.00, -1.00]"
    assert refused["confirmation agreement % [95% CI]"] == "—"
    assert unconfirmed["accepted"] == "yes (verdict)" and unconfirmed["confirmed"] == "no"
    assert unconfirmed["confirmation verdict"] == "FAIL"
    assert unconfirmed["confirmation Δ top-1 pts [95% CI]"] == "-1.50 [-2.50, -0.50]"
    assert chosen["variant"] == "`ort-int8-pct-keep2` (chosen)"
    assert chosen["tuning agreement % [95% CI]"] == "99.50 [98.5, 100.0]"
    assert chosen["confirmation agreement % [95% CI]"] == "99.25 [98.2, 99.8]"
    assert (chosen["latency ms"], chosen["images/s"], chosen["speedup vs FP32"]) == ("3.00", "420.0", "4.20×")
    assert (chosen["size MB"], chosen["size % of FP32"], chosen["step s"]) == ("5.60", "30", "12.5")

    error, hostile, unmeasured = tables["openvino"]
    assert error["status"] == r"error: RuntimeError: \<boom\> \| pipe"  # escaped: one cell, no HTML
    assert error["tuning agreement % [95% CI]"] == "—" and error["images/s"] == "—"
    assert hostile["variant"] == r"`a\|b<script>alert(1)</script>`" and hostile["★"] == "★"
    assert hostile["tuning verdict"] == "INCONCLUSIVE" and hostile["accepted"] == "no"
    assert unmeasured["tuning verdict"] == "—" and unmeasured["latency ms"] == "—"


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            a = dict(attrs)
            self.images.append((a.get("alt", ""), a.get("src", "")))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Markup:
    parsed = _Markup()
    parsed.feed(html)
    parsed.close()
    return parsed


def test_hostile_names_render_as_text(tmp_path):
    from markdown_it import MarkdownIt

    report = make_report(tmp_path, tune_section())
    rendered = _parse(MarkdownIt("commonmark").enable("table").render(render_markdown(report)))
    assert "script" not in rendered.tags
    assert HOSTILE in "".join(rendered.text)  # shown as written, the pipe included
    page = _parse(render_html(report))
    assert "script" not in page.tags
    text = "".join(page.text)
    assert HOSTILE in text and "RuntimeError: <boom> | pipe" in text


def test_html_has_the_ladder_tables_and_the_pareto_plot(tmp_path):
    html = render_html(make_report(tmp_path, tune_section()))
    page = _parse(html)
    assert "<h2>Tuning</h2>" in html and "<h3>onnxruntime</h3>" in html and "<h3>openvino</h3>" in html
    ladders = html.count(f'<th class="l">{LADDER_HEADER[0]}</th><th class="l">step</th>')
    assert ladders == 2
    assert html.count('<tr class="chosen">') == 1 and "tr.chosen td" in html
    assert '<td class="v-pass">PASS</td>' in html and '<td class="v-inconclusive">INCONCLUSIVE</td>' in html
    (alt, src), = [img for img in page.images if img[0].startswith("tuning candidates")]
    assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    # Four candidates have throughput and tuning stats; the error one and the untimed one are left out.
    assert "4 candidates;" in html and "2 candidates without a measured throughput" in html


def test_pareto_points_budget_and_log_scale(tmp_path, monkeypatch):
    tune = make_report(tmp_path, tune_section()).tune
    points, left_out = pareto_points(tune)
    assert [p.name for p in points] == ["ort-int8-minmax", "ort-int8-pct", "ort-int8-pct-keep2", HOSTILE]
    assert left_out == 2
    assert [p.chosen for p in points] == [False, False, True, False]
    assert points[0].delta_pts == pytest.approx(-3.0) and points[0].ci_pts == pytest.approx((-5.0, -1.0))
    assert budget_pts(tune) == pytest.approx(1.0)

    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"png")
    assert plots.tune_pareto(tune) == b"png"  # 100 to 500 images/s: linear
    ax = figures[-1].axes[0]
    assert ax.get_xscale() == "linear"
    assert any(list(line.get_ydata()) == [-1.0, -1.0] for line in ax.get_lines())  # the budget
    wide = make_report(tmp_path, tune_section(ort_throughput=(3.0, 4.0))).tune  # 3 to 500 images/s
    plots.tune_pareto(wide)
    assert figures[-1].axes[0].get_xscale() == "log"


def test_relative_budget_is_read_from_the_verdicts(tmp_path):
    section = tune_section()
    section["budget"] = {"max_drop": 1.0, "drop": "relative", "description": "MLPerf", "label": "mlperf"}
    for c in section["candidates"]:
        if "tuning_verdict" in c:
            c["tuning_verdict"]["budget"] = 0.008  # 1% of an 80% top-1
    assert budget_pts(make_report(tmp_path, section).tune) == pytest.approx(0.8)
    section["candidates"] = [c for c in section["candidates"] if "tuning_verdict" not in c]
    assert budget_pts(make_report(tmp_path, section).tune) is None  # not known without the reference's top-1


def test_no_plot_without_measured_candidates(tmp_path):
    section = tune_section()
    for c in section["candidates"]:
        c.pop("throughput_ips", None)
    html = render_html(make_report(tmp_path, section))
    assert "<h2>Tuning</h2>" in html and not any(a.startswith("tuning candidates") for a, _ in _parse(html).images)


def test_a_tune_section_only_adds_to_report_md(tmp_path):
    with_tune = render_markdown(make_report(tmp_path, tune_section()))
    without = render_markdown(make_report(tmp_path))
    assert "Tuning" not in without and "tr.chosen" not in render_html(make_report(tmp_path))
    start = with_tune.index("\n## Tuning")
    end = with_tune.index("\n## ", start + 1)
    assert with_tune[:start] + with_tune[end:] == without


def test_report_json_round_trip_renders(tmp_path):
    report = make_report(tmp_path, tune_section())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report.write(run_dir / "report.json")
    back = Report.read(run_dir / "report.json")
    assert back.tune.model_dump(mode="json") == report.tune.model_dump(mode="json")
    assert back.tune.sets.tuning_ids == ["t0.JPEG", "t1.JPEG", "t2.JPEG"]
    md_path, html_path = render(run_dir)
    assert md_path.read_text() == render_markdown(report)
    assert "<h2>Tuning</h2>" in html_path.read_text()


EVIL = ("<script>alert(1)</script>\" onmouseover=\"alert(2)' `tick` | pipe\nnew line # heading [link](javascript:x) "
        "<img src=x onerror=alert(4)> **bold** _em_ &amp; $x^2$ http://evil.invalid\u2028-->\u0000")


def _crafted(text: str) -> dict:
    """The tune section with `text` in every string it shows: names (kept distinct and consistent), backends, steps,
    errors, the rule, the reasons, the sets' source, the deploy path."""
    section = tune_section()
    names = {c["name"]: f"n{i} {text}" for i, c in enumerate(section["candidates"])}
    names.update({b["fp32"]: f"f{i} {text}" for i, b in enumerate(section["backends"])})
    backends = {b["backend"]: f"b{i} {text}" for i, b in enumerate(section["backends"])}
    for c in section["candidates"]:
        c.update(name=names[c["name"]], backend=backends[c["backend"]], step=text)
        if c.get("error"):
            c["error"] = text
        if c.get("accepted_by"):
            c["accepted_by"] = text
    for b in section["backends"]:
        b.update(backend=backends[b["backend"]], fp32=names[b["fp32"]], stopped=text,
                 pareto=[names[n] for n in b["pareto"]], chosen=names.get(b["chosen"]))
        if b.get("deploy"):
            b["deploy"] = text
    section.update(objective=text, rule=text, choice=names[section["choice"]], choice_reason=text)
    section["budget"]["description"] = text
    section["sets"]["confirmation_source"] = text
    return section


class _Elements(HTMLParser):
    """Every element and attribute of a page in order (image data left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, tuple((k, v.split(",")[0] if k == "src" else v) for k, v in attrs)))

    def handle_endtag(self, tag):
        self.elements.append(("/" + tag,))

    def handle_comment(self, data):
        self.elements.append(("<!--", data))


def _elements(html: str) -> list[tuple]:
    parsed = _Elements()
    parsed.feed(html)
    parsed.close()
    return parsed.elements


def test_hostile_tune_section_renders_no_live_markup(tmp_path):
    """Every string of the section crafted: the HTML and the Markdown (rendered by CommonMark + tables) have exactly
    the elements of the same report with plain strings, so none came from the data."""
    from markdown_it import MarkdownIt

    hostile, plain = make_report(tmp_path, _crafted(EVIL)), make_report(tmp_path, _crafted("x"))
    assert _elements(render_html(hostile)) == _elements(render_html(plain))
    hostile_md, plain_md = render_markdown(hostile), render_markdown(plain)
    assert len(hostile_md.splitlines()) == len(plain_md.splitlines())
    md = MarkdownIt("commonmark").enable("table")
    assert _elements(md.render(hostile_md)) == _elements(md.render(plain_md))
