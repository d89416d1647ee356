"""`flatdino bench throughput`: both latent shapes, every batch size, CSV and plot."""

from __future__ import annotations

import csv

from typer.testing import CliRunner

from flatdino.cli.main import app


def test_throughput_writes_csv_and_plot(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "throughput",
            "--preset",
            "tiny",
            "--batches",
            "1,2",
            "--seconds",
            "0",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "throughput.csv").read_text().splitlines()))
    assert [(r["latent"], r["tokens"], r["batch"]) for r in rows] == [
        ("FlatDINO", "32", "1"),
        ("FlatDINO", "32", "2"),
        ("RAE", "256", "1"),
        ("RAE", "256", "2"),
    ]
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
    assert (tmp_path / "throughput.png").stat().st_size > 5_000 and "ratio" in result.output
    bad = CliRunner().invoke(
        app, ["bench", "throughput", "--preset", "huge", "--out", str(tmp_path)]
    )
    assert bad.exit_code == 1 and "--preset must be one of" in bad.output
