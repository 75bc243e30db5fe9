"""report.html: rendered from report.json alone, standalone (embedded PNGs, no external resources), re-rendered by
`int8eval report`; a real headless Chromium screenshot when chromium is installed."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from int8eval import stats
from int8eval.config import Preprocessing
from int8eval.evaluate import Predictions
from int8eval.report import render
from int8eval.config import Acceptance
from int8eval.report.schema import DataSection, ModelSection, Report, Status, VariantResult
from int8eval.verdict import add_paired_stats

REF = "torch-fp32"


def synthetic_run(tmp_path: Path, n: int = 400, seed: int = 0) -> tuple[Report, Predictions]:
    """A run without a model: the reference right on ~88% of images, one INT8 variant flipping a few images
    (passes a 1-point budget... or is inconclusive) and one flipping many (fails)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 1000, n)
    top5 = {}
    ref_top1 = np.where(rng.random(n) < 0.88, labels, (labels + 1) % 1000)
    top5[REF] = np.stack([ref_top1] + [(ref_top1 + k) % 1000 for k in range(2, 6)], axis=1).astype(np.int16)
    for name, rate in (("onnxruntime-int8-percentile99.999", 0.004), ("onnxruntime-int8-minmax-pertensor", 0.12)):
        flip = rng.random(n) < rate
        t1 = np.where(flip, (ref_top1 + 7) % 1000, ref_top1)
        top5[name] = np.stack([t1] + [(t1 + k) % 1000 for k in range(2, 6)], axis=1).astype(np.int16)
    preds = Predictions(
        image_ids=[f"img{i}.JPEG" for i in range(n)],
        labels=labels.astype(np.int64),
        top5=top5,
        kl_to_ref={k: rng.random(n).astype(np.float32) * 1e-3 for k in top5 if k != REF},
        cos_to_ref={k: 1 - rng.random(n).astype(np.float32) * 1e-4 for k in top5 if k != REF},
    )
    variants = []
    for name in top5:
        backend, precision = name.split("-")[0], name.split("-")[1]
        v = VariantResult(name=name, backend=backend, precision=precision, status="ok", reference=name == REF,
                          size_mb=18.9 if name == REF else 5.2)
        v.top1, v.top1_ci95 = stats.accuracy_ci(preds.correct1(name))
        v.top5, v.top5_ci95 = stats.accuracy_ci(preds.correct5(name))
        if name != REF:
            v.agreement_top1 = stats.agreement(preds.top1(name), preds.top1(REF))
            v.delta_top1 = v.top1 - float(np.mean(preds.correct1(REF)))
        variants.append(v)
    variants.append(VariantResult(name="openvino-int8-minmax", backend="openvino", precision="int8", status="error",
                                  error="RuntimeError: <boom> & friends"))
    report = Report(
        created="2025-01-01T00:00:00+00:00",
        model=ModelSection(name="tiny_test", source="random", num_params=1234,
                           preprocessing=Preprocessing(resize=40, crop=32)),
        data=DataSection(root=str(tmp_path), layout="folder-per-synset", num_found=n, num_images=n, num_skipped=0),
        variants=variants,
        environment={"cpu": {"model": "test CPU", "logical_cores": 2, "isa": {"avx2": True}}, "gpu": None,
                     "libraries": {"numpy": np.__version__}},
    )
    return report, preds


class _Structure(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("src", "href"):
            value = a.get(key)
            if value and not value.startswith(("data:", "#")):
                self.external.append(f"{tag} {key}={value}")


def _write_run(tmp_path: Path, *, sensitivity: dict | None = None, bench: bool = False) -> Path:
    report, preds = synthetic_run(tmp_path)
    add_paired_stats(report, preds, Acceptance(max_drop=1.0))
    report.sensitivity = sensitivity
    if bench:
        for i, v in enumerate(report.variants):
            if v.status == "ok":
                lat = 10.0 / (i + 1)
                v.bench = {"throughput_ips": 100.0 * (i + 1), "throughput_batch": 32, "threads": 2,
                           "latency_ms_p50": lat, "latency_ms_p90": lat * 1.1, "latency_ms_p99": lat * 1.3}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report.write(run_dir / "report.json")
    return run_dir


SENSITIVITY = {
    "spec_description": "per-channel symmetric int8 weights, per-tensor minmax activations",
    "num_calib": 8, "num_images": 16, "rank_by": "KL when only this layer is INT8",
    "all_quantized": {"agreement": 0.9, "kl": 0.01}, "weights_only": {"agreement": 0.95, "kl": 0.004},
    "activations_only": {"agreement": 0.93, "kl": 0.006},
    "layers": [
        {"module": f"features.{i}", "onnx_node": f"/features/features.{i}/Conv", "type": "Conv2d",
         "only": {"agreement": 1 - 0.01 * i, "kl": 1e-4 * (i + 1)}, "all_but": {"agreement": 0.9 + 0.01 * i, "kl": 0.008},
         "only_weight": {"agreement": 1.0, "kl": 1e-5}, "only_act": {"agreement": 1.0, "kl": 1e-4},
         "sqnr_db": {"local": 30.0 - i, "accumulated": 20.0}}
        for i in range(3)
    ],
    "ranking": ["features.2", "features.1", "features.0"],
    "top_k": ["features.2"],
    "keep_fp32": {"layers": ["features.2"], "agreement": 0.95, "kl": 0.005},
}


def test_html_is_standalone_and_has_tables_and_figures(tmp_path):
    run_dir = _write_run(tmp_path, sensitivity=SENSITIVITY)
    paths = render(run_dir)
    assert {p.name for p in paths} == {"report.md", "report.html"}
    html = (run_dir / "report.html").read_text()
    parsed = _Structure()
    parsed.feed(html)
    assert parsed.external == []  # nothing fetched from anywhere: the file stands alone
    assert not re.search(r"https?://", html)
    assert parsed.tags.count("table") >= 3  # summary, paired details, sensitivity
    # accuracy-vs-size, flips per class, sensitivity bars: all embedded PNGs that decode
    assert len(parsed.images) == 3
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no speed was measured" in html.lower()  # said when size stands in for speed
    assert "PASS" in html or "INCONCLUSIVE" in html
    assert "FAIL" in html
    assert "&lt;boom&gt; &amp; friends" in html  # errors are escaped, not injected
    assert "/features/features.2/Conv" in html
    md = (run_dir / "report.md").read_text()
    assert "## Paired comparison with torch-fp32" in md and "### Verdicts" in md
    assert "## Per-layer sensitivity" in md


def test_html_uses_throughput_when_benchmarked(tmp_path):
    run_dir = _write_run(tmp_path, bench=True)
    render(run_dir)
    html = (run_dir / "report.html").read_text()
    assert "Accuracy vs speed" in html and "images/s" in html
    assert "no speed was measured" not in html.lower()


def test_report_command_rerenders(tmp_path):
    from click.testing import CliRunner

    from int8eval.cli import main

    run_dir = _write_run(tmp_path)
    result = CliRunner().invoke(main, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert (run_dir / "report.md").is_file()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_screenshot_in_headless_chromium(tmp_path):
    run_dir = _write_run(tmp_path, sensitivity=SENSITIVITY)
    render(run_dir)
    shot = tmp_path / "report.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"
    subprocess.run(["bash", str(script), str(run_dir / "report.html"), str(shot)], check=True, timeout=120,
                   capture_output=True)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 20_000  # a rendered page, not a blank one


def test_both_reports_say_how_each_int8_variant_was_built(tmp_path):
    from int8eval.config import Recipe
    from int8eval.report.html import render_html
    from int8eval.report.markdown import render_markdown

    report, _ = synthetic_run(tmp_path)
    v = next(v for v in report.variants if v.name == "onnxruntime-int8-percentile99.999")
    v.recipe = Recipe(backend="onnxruntime", calib="percentile", keep_fp32=("a.b", "c", "d", "e")).model_dump(mode="json")
    v.details = {"exact_int8_kernels": True, "ignored": 1}
    row = "| onnxruntime-int8-percentile99.999 |"  # the row is the variant's; its recipe says what was kept
    md = render_markdown(report)
    assert "## How the INT8 variants were built" in md
    line = next(line for line in md.splitlines() if line.startswith(row) and "percentile 99.999" in line)
    assert "| int8eval's |" in line and "4: a.b, c, d, ..." in line and "exact_int8_kernels True" in line
    assert "ignored" not in line
    html = render_html(report)
    assert "How the INT8 variants were built" in html and "int8eval&#x27;s" in html


# --- a report.json from someone else: nothing in it becomes markup ------------------------------------------------

HOSTILE = ("<script>alert(1)</script>\" onmouseover=\"alert(2)' `tick` ``two`` | pipe\nnew line\r\n# heading "
           "[link](javascript:alert(3)) ![img](http://x.invalid/y.png) <img src=x onerror=alert(4)> **bold** _em_ "
           "&amp; &lt;b&gt; $x^2$ ~~strike~~ http://evil.invalid www.evil.invalid\u2028-->\u0000")


def _crafted(tmp_path: Path, text: str) -> Report:
    """The synthetic run with `text` in every string a renderer shows: names, errors, reasons, paths, class names,
    details, environment, sensitivity, bench, the criterion."""
    report, preds = synthetic_run(tmp_path, n=200)
    add_paired_stats(report, preds, Acceptance(max_drop=1.0))
    report.created, report.model.name, report.model.source = text, text, text
    report.data.root, report.data.layout = text, text
    report.data.skipped, report.data.num_skipped = [{"path": text + ".JPEG", "reason": text}], 1
    report.acceptance.description = text
    report.environment = {"cpu": {"model": text, "logical_cores": text, "isa": {text: True}}, "gpu": text,
                          "libraries": {text: text}}
    layers = [dict(layer, module=f"{text}{i}", onnx_node=text, type=text) for i, layer in enumerate(SENSITIVITY["layers"])]
    report.sensitivity = dict(SENSITIVITY, layers=layers, ranking=[x["module"] for x in layers], top_k=[layers[0]["module"]],
                              spec_description=text, rank_by=text)
    report.bench = {"warnings": [text], "machine": {"cpu": {"model": text, "isa": {text: True}}, "gpu": text}}
    for i, v in enumerate(report.variants):
        v.name = f"v{i} {text}"
        v.gated_by = text
        if v.error:
            v.error = text
        if v.precision == "int8":
            v.recipe = {"calib": text, "keep_fp32": [text, text], "per_channel": True, "bias_correction": True}
            v.details = {"flow": text, "nncf": {text: text}, "first_layer_fp32": [text]}
            v.bench = {"throughput_ips": None, "error": text, "size_mb": 1.0}
        if v.paired:
            v.paired.ci_method = v.paired.test = text
            v.paired.classes_lost_most = [{"wnid": text, "name": text, "n": 3, "lost": 2, "gained": 0, "net": 2}]
            v.paired.flips_by_class = {text: {"n": 3, "lost": 2, "gained": 0}}
            v.compared_with = {text: v.paired}
        if v.verdict:
            v.verdict.reason = text
    return Report.model_validate(report.model_dump(mode="json"))  # as read back from report.json


class _Markup(HTMLParser):
    """Every element and attribute of a page, in order (image data left out), and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, tuple((k, v if k != "src" else v.split(",")[0]) for k, v in attrs)))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        self.elements.append(("/" + tag,))

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        self.elements.append(("<!--", data))


def _markup(html: str) -> _Markup:
    parsed = _Markup()
    parsed.feed(html)
    parsed.close()
    return parsed


def test_hostile_report_renders_no_live_markup(tmp_path):
    """A crafted report.json: its HTML has exactly the elements and attributes of the same report with plain names
    (so none came from the data), and the same holds for its Markdown rendered by a CommonMark + tables parser."""
    from markdown_it import MarkdownIt

    from int8eval.report.html import render_html
    from int8eval.report.markdown import render_markdown

    hostile, plain = _crafted(tmp_path, HOSTILE), _crafted(tmp_path, "x")
    html = _markup(render_html(hostile))
    assert html.elements == _markup(render_html(plain)).elements
    assert sum(e[0] == "script" for e in html.elements) == 0
    assert all(k in ("lang", "charset", "class", "alt", "src") for e in html.elements[1:] for k, _ in (e[1] if len(e) > 1 and isinstance(e[1], tuple) else ()))
    text = "".join(html.text)
    assert "<script>alert(1)</script>" in text and "<img src=x onerror=alert(4)>" in text  # shown, not run
    assert "&amp; &lt;b&gt;" in text  # entities shown as typed, not decoded

    md = MarkdownIt("commonmark").enable("table").enable("strikethrough")
    hostile_md, plain_md = render_markdown(hostile), render_markdown(plain)
    assert len(hostile_md.splitlines()) == len(plain_md.splitlines())  # no line breaks smuggled in
    rendered = _markup(md.render(hostile_md))
    assert rendered.elements == _markup(md.render(plain_md)).elements  # no link, image, HTML, code, heading, cell
    shown = "".join(rendered.text)
    assert "<script>alert(1)</script>" in shown and "[link](javascript:alert(3))" in shown and "| pipe" in shown
    assert "`tick` ``two``" in shown and "**bold** _em_" in shown and "$x^2$ ~~strike~~" in shown


@pytest.mark.parametrize("where, value, field", [
    (("variants", 1, "status"), "<b>ok</b>", "variants.1.status"),
    (("variants", 1, "verdict", "verdict"), 'pass" onclick="x', "variants.1.verdict"),
    (("variants", 0, "backend"), "tensorflow", "variants.0.backend"),
    (("variants", 2, "precision"), "int4", "variants.2.precision"),
    (("data", "skipped"), [{"path": "a.JPEG"}], "data.skipped"),
    (("variants", 1, "paired", "top1", "diff"), "<i>big</i>", "variants.1.paired"),
    (("files",), {"../../etc/passwd": "0" * 64}, "files"),
    (("run_id",), "x\n<script>", "run_id"),
])
def test_tampered_report_json_is_refused_naming_the_field(tmp_path, where, value, field):
    import json

    from int8eval.errors import RunFolderError

    run_dir = _write_run(tmp_path)
    data = json.loads((run_dir / "report.json").read_text())
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (run_dir / "report.json").write_text(json.dumps(data))
    with pytest.raises(RunFolderError, match=re.escape(field)):
        render(run_dir)
    assert not (run_dir / "report.html").exists()


def test_report_json_reads_back_as_written(tmp_path):
    """Enums are checked but kept as the strings report.json holds: reading and writing changes nothing."""
    run_dir = _write_run(tmp_path, sensitivity=SENSITIVITY, bench=True)
    before = (run_dir / "report.json").read_text()
    Report.read(run_dir / "report.json").write(run_dir / "report.json")
    assert (run_dir / "report.json").read_text() == before
    assert Report.read(run_dir / "report.json").variants[0].status == "ok"


# --- typed sections: older report.json files still read; unknown keys refused; errors shown as text --------------


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_an_older_report_json_still_reads_and_rerenders(tmp_path, version):
    """A report.json of an older schema (every section as its writer gave it, as plain JSON; 1.0 had no run_id and
    no file checksums) is read into the typed sections, rendered as the current one is, and rewritten as 1.2."""
    import json

    from int8eval.report import rerender
    from int8eval.report.markdown import render_markdown
    from int8eval.report.sections import BenchSection, PairedSection, Sensitivity, Status, Verdict, VerdictSection
    from int8eval.report.schema import SCHEMA_VERSION
    from int8eval.verdict import apply_to_run_dir

    run_dir = _write_run(tmp_path, sensitivity=SENSITIVITY, bench=True)
    report = Report.read(run_dir / "report.json")
    expected_md = render_markdown(report)
    data = json.loads((run_dir / "report.json").read_text())
    data["schema_version"] = version
    if version == "1.0":
        data.pop("run_id", None)
        data.pop("files", None)
    data["bench"] = {"machine": {"cpu": {"model": "old CPU", "isa": {}}}, "settings": {"batch_sizes": [1, 32]},
                     "warnings": [], "speed_only": {"torch-fp32-eager": {"throughput_ips": 5.0, "latency_ms_p50": 1.0,
                                                                         "latency_ms_p90": 1.0, "latency_ms_p99": 1.0}}}
    (run_dir / "report.json").write_text(json.dumps(data))

    old = Report.read(run_dir / "report.json")
    assert old.schema_version == version
    v = old.variant("onnxruntime-int8-minmax-pertensor")
    assert isinstance(v.paired, PairedSection) and isinstance(v.verdict, VerdictSection)
    assert v.verdict.verdict is Verdict.failed and v.status is Status.ok
    assert isinstance(old.sensitivity, Sensitivity) and isinstance(old.bench, BenchSection)
    rerender(run_dir)
    md = (run_dir / "report.md").read_text()
    assert md.split("## Speed and size")[0] == expected_md.split("## Speed and size")[0]  # the same report as before
    assert "torch-fp32-eager | not evaluated" in md and "old CPU" in md
    assert "FAIL" in (run_dir / "report.html").read_text()

    preds = synthetic_run(tmp_path)[1]
    preds.save(run_dir / "predictions.npz")
    apply_to_run_dir(run_dir, Acceptance(max_drop=50.0))  # re-judged: rewritten in this version's schema
    again = json.loads((run_dir / "report.json").read_text())
    assert again["schema_version"] == SCHEMA_VERSION
    assert again["variants"][1]["verdict"]["verdict"] == "pass"


@pytest.mark.parametrize("where", [
    ("variants", 1, "paired"), ("variants", 1, "paired", "top1"), ("variants", 1, "verdict"), ("variants", 1, "bench"),
    ("bench",), ("bench", "settings"), ("acceptance",), ("sensitivity",), ("sensitivity", "layers", 0),
    ("sensitivity", "layers", 0, "only"),
])
def test_typed_sections_refuse_an_unknown_key(tmp_path, where):
    import json

    from int8eval.errors import RunFolderError

    run_dir = _write_run(tmp_path, sensitivity=SENSITIVITY, bench=True)
    data = json.loads((run_dir / "report.json").read_text())
    data["bench"] = {"settings": {"batch_sizes": [1, 32]}, "warnings": []}
    node = data
    for key in where:
        node = node[key]
    node["diff_typo"] = 1
    (run_dir / "report.json").write_text(json.dumps(data))
    field = ".".join(map(str, where)) + ".diff_typo"
    with pytest.raises(RunFolderError, match=re.escape(field) + ": Extra inputs are not permitted"):
        Report.read(run_dir / "report.json")


def test_a_section_refuses_an_unknown_key_when_assigned_too(tmp_path):
    from pydantic import ValidationError

    report, preds = synthetic_run(tmp_path)
    add_paired_stats(report, preds, Acceptance(max_drop=1.0))
    v = report.variants[1]
    with pytest.raises(ValidationError, match="speedup_vs_fp64"):
        v.bench = {"throughput_ips": 1.0, "speedup_vs_fp64": 2.0}
    with pytest.raises(ValidationError, match="verdict"):
        v.verdict.verdict = "maybe"
    v.status = "parity_failed"  # checked and kept as the Status member
    assert v.status is Status.parity_failed and f"{v.status}" == "parity_failed"


def test_a_variant_error_with_rich_markup_prints_literally(tmp_path, monkeypatch):
    """The CLI's summary shows names, errors and verdict reasons as text: `[red]` or a stray `[/bold]` in an error
    is printed as written, not taken as markup (nor raised as a markup error)."""
    from io import StringIO

    from rich.console import Console

    from int8eval import cli

    report, preds = synthetic_run(tmp_path)
    add_paired_stats(report, preds, Acceptance(max_drop=1.0))
    broken = report.variant("openvino-int8-minmax")
    broken.error = "RuntimeError: [red]not red[/red] in /tmp/[x] [/bold]"
    report.variants[1].verdict.reason = "[bold]not bold[/bold]"
    out = StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=300, color_system=None))
    cli._print_summary(report, tmp_path / "[run]")
    text = out.getvalue()
    assert "openvino-int8-minmax: RuntimeError: [red]not red[/red] in /tmp/[x] [/bold]" in text
    assert "[bold]not bold[/bold]" in text
    assert f"{tmp_path / '[run]' / 'report.json'}" in text
