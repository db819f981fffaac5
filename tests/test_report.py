"""``inspect3d report`` on a store filled by replaying synthetic jobs through the real watcher.

Checks content (verdicts, reasons, rates, versions, charts, record files), not pixels.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import sqlite3
import subprocess
import sys

import cv2
import numpy as np
import pytest
from markupsafe import escape
from review_fixtures import (
    HOSTILE_JOB,
    HOSTILE_NOTE,
    HOSTILE_PRINTER,
    LAYER_S,
    load_shop,
)

from inspect3d.cli import main as inspect3d_main
from inspect3d.review import decisions, shop
from inspect3d.review.chart import CHAR_W, H, W, score_chart
from inspect3d.review.report import build_report, page_name
from inspect3d.watch.status import jobs as status_jobs


def test_summary_lists_every_job_by_printer_with_rates_and_versions(state, tmp_path):
    index = build_report(state, tmp_path / "report")
    text = index.read_text()
    expected = status_jobs(state)
    assert {j["verdict"] for j in expected} >= {"REJECT"}
    for j in expected:
        assert escape(j["job"]) in text and escape(j["printer"]) in text
    s = load_shop(state)
    for printer, jobs in s.printers().items():
        rate = 100 * sum(j.verdict == "REJECT" for j in jobs) / len(jobs)
        assert f"{rate:.0f}%" in text, printer
    meta = s.meta
    assert meta["model_sha"][:16] in text and meta["policy"] in text
    links = [f'href="jobs/{page_name(j)}.html"' for j in s.jobs]
    assert all(link in text for link in links)
    open_reviews = sum(len(j.flagged) for j in s.jobs)  # nothing reviewed yet
    assert f"<b>{open_reviews}</b> flagged layers still to review" in text


def test_time_to_detect_of_a_replay_uses_arrival_times_and_says_replayed(state, tmp_path):
    records = [json.loads(x) for x in (state / "rejects.jsonl").read_text().splitlines()]
    rejects = {(r["printer"], r["job"]): r for r in records if r["kind"] == "REJECT"}
    assert rejects
    paced = 0
    for job in load_shop(state).jobs:
        assert job.replayed  # the whole inbox was there before the watcher started
        layers, minutes = job.time_to_detect()
        r = rejects.get((job.printer, job.name))
        if r is None:
            assert (layers, minutes) == (None, None)
            continue
        assert layers == r["reason"]["at_layer"] - r["reason"]["first_bad_layer"]
        if job.printer == HOSTILE_PRINTER:  # copied all at once: no printing time to tell
            assert minutes is None
        else:  # the printer's pace, not the seconds the replay took
            assert minutes == pytest.approx(layers * LAYER_S / 60, abs=0.01)
            paced += layers > 0
    assert paced
    text = build_report(state, tmp_path / "report").read_text()
    assert "(replayed)" in text and "replayed</span>" in text


def test_time_to_detect_of_a_live_job_runs_to_the_decision(state):
    job = next(j for j in load_shop(state).jobs if "REJECT" in j.records and j.flagged)
    t0 = 1_000_000.0
    for i, x in enumerate(job.layers):  # one layer a minute, each scored 2 s after it arrived
        x.at, x.scored_at = t0 + 60 * i, t0 + 60 * i + 2
    assert not job.replayed
    first = job.caught["first_bad_layer"]
    onset = next(x.at for x in job.layers if x.layer == first)
    job.decided_at["REJECT"] = onset + 150
    assert job.time_to_detect()[1] == pytest.approx(2.5)


def test_job_page_has_chart_evidence_versions_and_layer_record(state, tmp_path):
    out = tmp_path / "report"
    build_report(state, out)
    job = next(j for j in load_shop(state).jobs if j.verdict == "REJECT" and j.flagged)
    page = (out / "jobs" / f"{page_name(job)}.html").read_text()
    assert "<svg" in page and "threshold" in page and "first bad layer" in page
    assert "REJECT (" in page  # the decision's mark on the chart
    shown = min(len(job.flagged), 24)
    assert page.count('<figure class="plain">') == page.count('<figure class="map">') == shown
    assert page.count('src="data:image/jpeg;base64,') >= 2 * shown  # plain layer and overlay
    assert f"Layer {job.flagged[0].layer}</b> as photographed" in page
    name, p = job.named_defect()
    assert name and name != load_shop(state).normal_class()  # a defect class, not 'ok'
    assert f"Likeliest defect: {name} (p={p:.2f})." in page
    assert job.model["sha256"][:16] in page and job.policy in page
    folder = out / "jobs" / page_name(job)
    stack = np.load(folder / "defect_maps.npy")
    scored = [x for x in job.layers if x.status == "scored"]
    assert stack.shape[0] == len(scored) and stack.ndim == 3
    assert (folder / "layers.txt").read_text().split() == [str(x.layer) for x in scored]
    np.testing.assert_allclose(stack[0], scored[0].defect_map, atol=1e-3)
    for name in ("side", "top"):
        img = cv2.imread(str(folder / f"{name}.png"))
        assert img is not None and img.shape[0] > 100 and img.shape[1] >= 260  # axes, title, bar
        assert f'{page_name(job)}/{name}.png"' in page


def test_job_page_outlines_the_roi_its_decisions_carry(state, tmp_path):
    roi = [[0.2, 0.2], [0.8, 0.2], [0.8, 0.8], [0.2, 0.8]]
    con = sqlite3.connect(state / "watch.db")
    for did, record in con.execute("SELECT id, record FROM decisions").fetchall():
        record = {**json.loads(record), "roi": roi}  # as a normal-only model's watcher writes
        con.execute("UPDATE decisions SET record = ? WHERE id = ?", (json.dumps(record), did))
    con.commit()
    con.close()
    out = tmp_path / "report"
    build_report(state, out)
    job = next(j for j in load_shop(state).jobs if j.records and j.flagged)
    page = (out / "jobs" / f"{page_name(job)}.html").read_text()
    assert "polygon of 4 points (magenta outline)" in page
    assert "magenta line = inspected region" in page
    overlay_uri = re.search(r'class="overlay" src="data:image/jpeg;base64,([^"]+)"', page)
    img = cv2.imdecode(np.frombuffer(base64.b64decode(overlay_uri[1]), np.uint8), cv2.IMREAD_COLOR)
    b, g, r = (img[..., i].astype(int) for i in range(3))
    assert ((b > 180) & (r > 180) & (g < 90)).sum() > 50  # the magenta outline (JPEG-blurred)
    top = cv2.imread(str(out / "jobs" / page_name(job) / "top.png"))
    assert np.all(top == (255, 0, 255), axis=-1).sum() > 50


def test_hostile_names_and_notes_are_escaped(state, tmp_path):
    s = load_shop(state)
    job = next(j for j in s.jobs if j.printer == HOSTILE_PRINTER)
    assert job.name == HOSTILE_JOB and job.flagged
    store = shop.open_store(state)
    try:
        review = decisions.check(job.flagged[0].id, "false_alarm", "lighting", HOSTILE_NOTE, "<qa>")
        decisions.record(store, review)
    finally:
        store.close()
    out = tmp_path / "report"
    build_report(state, out)
    pages = [out / "index.html", out / "jobs" / f"{page_name(job)}.html"]
    for page in pages:
        text = page.read_text()
        for raw in (HOSTILE_PRINTER, HOSTILE_JOB, "<qa>", '<script>alert("note")'):
            assert raw not in text, (page.name, raw)
        assert escape(HOSTILE_JOB) in text
    job_page = pages[1].read_text()
    assert escape(HOSTILE_NOTE) in job_page and "by &lt;qa&gt;" in job_page


def test_moved_or_deleted_layer_images_are_said_not_crashed_on(state, tmp_path):
    con = sqlite3.connect(state / "watch.db")
    con.execute("UPDATE meta SET value = ? WHERE key = 'inbox'", (json.dumps("/nonexistent"),))
    con.commit()
    con.close()
    shutil.rmtree(state / "review")  # the evidence copies are gone too
    out = tmp_path / "report"
    build_report(state, out)
    job = next(j for j in load_shop(state).jobs if j.flagged)
    page = (out / "jobs" / f"{page_name(job)}.html").read_text()
    assert "have been moved or deleted" in page and "image file moved or deleted" in page
    assert "data:image/jpeg" not in page
    assert (out / "jobs" / page_name(job) / "defect_maps.npy").is_file()


def test_report_command_and_its_errors(state, tmp_path, capsys):
    out = tmp_path / "r"
    assert inspect3d_main(["report", f"state={state}", f"out={out}"]) == 0
    assert (out / "index.html").is_file()
    assert inspect3d_main(["report", f"state={tmp_path / 'nope'}", f"out={out}"]) == 2
    assert "no watcher state in" in capsys.readouterr().err
    assert inspect3d_main(["report", f"state={state}", f"out={out}", "colour=red"]) == 2
    err = capsys.readouterr().err
    assert "colour" in err and "valid keys: ['cell', 'db', 'max_thumbs', 'out', 'state']" in err
    assert inspect3d_main(["report", f"state={state}"]) == 2
    assert "out" in capsys.readouterr().err


def test_chart_marks_threshold_first_bad_layer_and_decisions():
    svg = str(score_chart([(0, 0.1), (1, 0.7), (2, 0.9)], 0.5, {"first bad layer": 1, "REJECT": 2}))
    assert svg.startswith("<svg") and "<polyline" in svg and ">threshold</text>" in svg
    assert "first bad layer (1)" in svg and "REJECT (2)" in svg
    assert svg.count('fill="#c0392b"><title>') == 2  # the two points over the threshold
    assert "No scored layers" in str(score_chart([], 0.5, {}))


def _labels(svg: str) -> list[tuple[float, float, float]]:
    """(left, right, baseline) of each mark label, from the SVG text (11 px font)."""
    out = []
    for m in re.finditer(r'<text x="([-\d.]+)" y="([-\d.]+)" fill="#\w+" font-weight="600">'
                         r"([^<]+)</text>", svg):  # fmt: skip
        left = float(m[1])
        out.append((left, left + len(m[3]) * CHAR_W, float(m[2])))
    return out


def test_chart_labels_do_not_collide_and_the_threshold_region_is_readable():
    points = [(i, 0.01 + 0.002 * i) for i in range(1, 12)] + [(12, 0.0798), (13, 0.2), (14, 0.3)]
    marks = {"first bad layer": 13, "WARN": 13, "REJECT": 14}
    svg = str(score_chart(points, 0.08, marks))
    assert "first bad layer, WARN (13)" in svg and "REJECT (14)" in svg  # one label per layer
    labels = _labels(svg)
    assert len(labels) == 2
    for a, b in itertools.combinations(labels, 2):
        assert a[2] != b[2] or a[1] < b[0] or b[1] < a[0], (a, b)  # other lane or apart
    assert all(left >= 0 and right <= W for left, right, _ in labels)  # nothing cut off
    circles = [float(y) for y in re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)"', svg)]
    below, above = circles[11], circles[12]  # 0.0798 and 0.2
    line = float(re.search(r'y1="([\d.]+)" y2="[\d.]+" stroke="#c0392b" stroke-dasharray', svg)[1])
    assert below > line > above  # either side of the threshold, visibly
    plot_h = H - 36 - 14
    assert line - above > 0.1 * plot_h  # 0.2 vs 0.08: far apart, not squeezed at the bottom
    assert (H - 36) - line > 0.3 * plot_h  # the threshold is not squeezed at 8 % of the axis


def test_review_commands_import_no_torch(replayed, tmp_path):
    """report, review and dataset run on the light install (numpy, OpenCV, jinja2)."""
    code = (
        "import sys; from pathlib import Path; "
        "import inspect3d.review.cli, inspect3d.review.report, inspect3d.review.server, "
        "inspect3d.review.dataset, inspect3d.review.decisions, inspect3d.review.images, "
        "inspect3d.review.chart, inspect3d.review.shop; "
        f"inspect3d.review.report.build_report(Path({str(replayed)!r}), Path({str(tmp_path)!r})); "
        "bad = [m for m in ('torch', 'torchvision', 'hydra') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "index.html").is_file()
