"""The append-only JSONL result log of the robustness checks, the check option parsers, and the HTML report."""

import json

import pytest

from arq_deploy.core.errors import ArqError, UnknownNameError
from arq_deploy.core.resultlog import JsonlLog, ResultLogMismatchError


def test_log_resumes_after_partial_line_without_losing_or_repeating(tmp_path):
    p = tmp_path / "c.jsonl"
    log = JsonlLog(p, {"seed": 1, "names": ["a", "b"]})
    log.append("a/1", {"accuracy": 0.5})
    log.append("a/2", {"accuracy": 0.25})
    with open(p, "a", encoding="utf-8") as f:  # a crash mid-row
        f.write('{"key": "a/3", "accur')
    again = JsonlLog(p, {"names": ["a", "b"], "seed": 1})
    assert [r["key"] for r in again.rows()] == ["a/1", "a/2"]
    assert "a/3" not in again and again.get("a/2")["accuracy"] == 0.25
    again.append("a/3", {"accuracy": 0.0})
    lines = p.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["key"] == "a/3"
    with pytest.raises(ValueError):
        again.append("a/3", {"accuracy": 1.0})


def test_log_refuses_other_settings_and_foreign_files(tmp_path):
    p = tmp_path / "c.jsonl"
    JsonlLog(p, {"seed": 1}).append("x", {})
    with pytest.raises(ResultLogMismatchError, match="seed"):
        JsonlLog(p, {"seed": 2})
    q = tmp_path / "other.jsonl"
    q.write_text("hello\n")
    with pytest.raises(ResultLogMismatchError, match="not a result log"):
        JsonlLog(q, {})
    assert q.read_text() == "hello\n"


def test_check_option_parsers():
    from arq_deploy.app.checks import parse_eps, parse_list, parse_severities

    assert parse_eps("2/255, 8/255") == [2 / 255, 8 / 255]
    assert parse_eps("0") == [0.0]
    for bad in ("-1/255", "abc", "1/0", "nan"):
        with pytest.raises(ArqError):
            parse_eps(bad)
    assert parse_severities("1-3,5") == [1, 2, 3, 5]
    for bad in ("0", "6", "1-6", "x"):
        with pytest.raises(ArqError):
            parse_severities(bad)
    assert parse_list("b,a", ["a", "b", "c"], "x") == ["b", "a"]
    assert parse_list("all", ["a", "b"], "x") == ["a", "b"]
    with pytest.raises(UnknownNameError, match="known: a, b"):
        parse_list("a,zz", ["a", "b"], "corruption")


def test_report_gathers_results_and_embeds_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arq_deploy.app.report import build_report

    run = tmp_path / "run"
    (run / "checks").mkdir(parents=True)
    (run / "cert.summary.json").write_text(json.dumps(
        {"meta": {"sigma": 0.25}, "summary": {"acr": 0.4321, "radii": [0, 0.5], "certified_accuracy": {"0": 0.8}}}))
    (run / "checks" / "corruptions.json").write_text(json.dumps(
        {"check": "corruptions", "meta": {"seed": 0}, "summary": {"mce": 1.234},
         "rows": [{"corruption": "fog", "severity": 1, "accuracy": 0.7}]}))
    (run / "manifest.json").write_text("{}")
    fig = plt.figure()
    plt.plot([0, 1])
    fig.savefig(run / "checks" / "corruptions.png")
    plt.close(fig)
    out = build_report(run)
    text = out.read_text()
    assert out == run / "report.html"
    assert "0.432" in text and "1.234" in text and "fog" in text  # ACR with 3 decimals
    assert text.count("data:image/png;base64,") == 1
    assert "manifest.json" in text  # listed as an unrecognised file, not dropped
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArqError, match="holds no results"):
        build_report(empty)
    assert not (empty / "report.html").exists()
