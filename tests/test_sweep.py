"""Sweeps: a grid / list of override sets expands to the right points, every point is validated before any
trains, each point is its own run directory in one W&B group, and a rerun skips finished points."""
from __future__ import annotations

import json

import pytest

from recipes.engine.config import ConfigError
from recipes.engine.sweep import expand, main, point_args, read_sweep


def _write(tmp_path, text):
    p = tmp_path / "sw.yaml"
    p.write_text(text)
    return p


def test_grid_times_points(tmp_path):
    spec = read_sweep(_write(tmp_path, "name: s1\nfixed: {trainer.max_steps: 3}\n"
                                       "grid: {optim.lr: [0.001, 0.003], run.seed: [1, 2]}\n"
                                       "points: [{model.size: tiny}, {data.block_size: 32}]\n"))
    points = expand(spec)
    assert len(points) == 8
    assert points[0] == {"model.size": "tiny", "optim.lr": 0.001, "run.seed": 1}
    assert points[7] == {"data.block_size": 32, "optim.lr": 0.003, "run.seed": 2}
    args = point_args(spec, 5, ["trainer.max_steps=4"])
    assert args[0] == "trainer.max_steps=3" and "trainer.max_steps=4" in args  # the command line comes later
    assert args[-2:] == ["run.run_id=s1-5", "logging.group=s1"]


@pytest.mark.parametrize("text,message", [("grid: {optim.lr: []}\n", "non-empty lists"),
                                          ("name: x\n", "nothing to sweep"),
                                          ("grdi: {a: [1]}\n", "expected the keys"),
                                          ("name: ../x\ngrid: {optim.lr: [1]}\n", "not a valid run id")])
def test_bad_sweep_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        read_sweep(_write(tmp_path, text))


def test_a_bad_point_fails_before_any_training(tmp_path, tiny_overrides):
    path = _write(tmp_path, "grid: {optim.lr: [0.001, -1.0]}\n")
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        main(["tiny", str(path), *tiny_overrides])
    assert not (tmp_path / "runs").exists()


def test_sweep_runs_every_point_and_skips_finished_ones(tmp_path, tiny_overrides, capsys):
    path = _write(tmp_path, "name: lrs\nfixed: {trainer.max_steps: 2, data.batch_size: 2, data.block_size: 32}\n"
                            "grid: {optim.lr: [0.001, 0.002]}\n")
    assert main(["tiny", str(path), *tiny_overrides]) == 0
    runs = tmp_path / "runs" / "tiny"
    for i, lr in enumerate([0.001, 0.002]):
        cfg = (runs / f"lrs-{i}" / "config.yaml").read_text()
        assert f"lr: {lr}" in cfg and "group: lrs" in cfg
        assert json.loads((runs / f"lrs-{i}" / "summary.json").read_text())["step"] == 2
    capsys.readouterr()
    assert main(["tiny", str(path), *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 2


def test_one_point_with_index_between_the_file_and_the_overrides(tmp_path, tiny_overrides):
    """The order launch.sh uses for an array task: `sweep <recipe> <file> --index I key=value ...`."""
    path = _write(tmp_path, "name: one\nfixed: {trainer.max_steps: 2, data.batch_size: 2, data.block_size: 32}\n"
                            "grid: {optim.lr: [0.001, 0.003]}\n")
    assert main(["tiny", str(path), "--index", "1", *tiny_overrides]) == 0
    runs = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in runs.iterdir()) == ["one-1"]
    assert "lr: 0.003" in (runs / "one-1" / "config.yaml").read_text()
