"""Compact export (sparse_core.export), the measured size/latency figures, their way into the CLI's JSON,
MLflow and analysis.

The acceptance check runs the real pipeline on digits: at density 0.01 the export is at most 5 % of
the dense state dict, and the reloaded plain model reaches exactly the run's test accuracy.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import runstore
from sparse_core import export, latency
from sparse_core.config import Config, ModelConfig, from_flat, run_key
from sparse_core.data import load as load_data
from sparse_core.masks import prunable_layers, set_masks
from sparse_core.metrics import evaluate
from sparse_core.models import build
from sparse_core.train import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = {"train.pre_epochs": 1, "train.post_epochs": 1, "train.device": "cpu"}
FIGURES = ("model_bytes_dense", "model_bytes_sparse", "latency_threads", "latency_dense_ms_b1", "latency_sparse_ms_b1",
           "latency_ratio_b1", "latency_dense_ms_b256", "latency_sparse_ms_b256", "latency_ratio_b256")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits MLP (64-100x5-10) at density 0.01, 1 + 1 epochs, exported."""
    path = str(tmp_path_factory.mktemp("export") / "model.safetensors")
    cfg = from_flat({**SHORT, "prune.density": 0.01})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(cfg, export_path=path)
    finally:
        torch.set_num_threads(threads)
    return cfg, result, path


def test_digits_export_is_small_and_reloads_to_the_runs_exact_accuracy(digits_run):
    cfg, result, path = digits_run
    assert result["model_bytes_sparse"] == os.path.getsize(path)
    assert result["model_bytes_sparse"] / result["model_bytes_dense"] <= 0.05  # the acceptance
    model = export.load(path)
    assert not any(type(m).__name__.startswith("Masked") for m in model.modules())  # the plain architecture
    data = load_data(cfg.data)
    acc, loss = evaluate(model, data.x_test, data.y_test, cfg.train.eval_batch_size)
    assert acc == result["test_acc"] and loss == pytest.approx(result["test_loss"], rel=1e-6)
    header = export.read_header(path)
    assert from_flat(header["config"]) == cfg.replace(**{"train.device": "auto"})  # where it ran is not kept
    assert header["run_key"] == run_key(cfg) == result["run_key"]
    assert sum(layer["kept"] for layer in header["layers"].values()) == result["kept_weights"]
    assert sum(int((w != 0).sum()) for w in (layer.weight for layer in prunable_layers(model).values())) \
        <= result["kept_weights"]


def test_every_run_reports_figures_and_the_mlp_has_a_sparse_path(digits_run):
    _, result, _ = digits_run
    for key in FIGURES:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["latency_threads"] == 1 and result["sparse_path"] == latency.SPARSE_PATH
    # the dense figure is the state dict as plain safetensors: 4 bytes a parameter plus a small header
    params = 64 * 100 + 4 * 100 * 100 + 100 * 10 + 5 * 100 + 10
    assert 4 * params < result["model_bytes_dense"] < 4 * params + 2000


def _layer(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < density
    return w, mask


@pytest.mark.parametrize("encoding", export.ENCODINGS)
@pytest.mark.parametrize("shape,density", [((100, 64), 0.01), ((100, 784), 0.3), ((8, 3, 3, 3), 0.5),
                                           ((10, 100), 0.0), ((7, 5), 1.0)])
def test_each_encoding_round_trips_exactly(encoding, shape, density):
    w, mask = _layer(shape, density)
    tensors = export.encode("w", w, mask, encoding)
    back = export.decode("w", shape, encoding, tensors)
    assert back.dtype == torch.float32 and torch.equal(back, w * mask)


@pytest.mark.parametrize("shape,density,expected", [
    ((100, 100), 1.0, "dense"),  # nothing to index
    ((100, 64), 0.4, "bitmap"),  # 1 bit per weight beats a 1-2 byte index per kept weight
    ((100, 100), 0.01, "flat"),  # 100 kept: uint16 positions beat 101 row pointers + columns
    ((100, 784), 0.01, "csr"),  # 78,400 weights need uint32 flat indices; CSR columns fit uint16
])
def test_choose_picks_the_smallest_measured_encoding(shape, density, expected):
    w, mask = _layer(shape, density)
    best, tensors, sizes = export.choose("w", w, mask)
    assert set(sizes) == set(export.ENCODINGS) and sizes[best] == min(sizes.values())
    assert best == expected, sizes
    for encoding, size in sizes.items():  # each candidate's size is its real serialised size
        from safetensors.torch import save
        assert size == len(save(export.encode("w", w, mask, encoding)))
    assert export.index_dtype(255) == torch.uint8 and export.index_dtype(65_535) == torch.uint16
    assert export.index_dtype(78_399) == torch.uint32 and export.index_dtype(2**32) == torch.int64


def test_vgg_with_batchnorm_round_trips_and_has_no_sparse_path(tmp_path):
    """Conv weights sparse, BatchNorm (running stats included) and biases dense; outputs identical."""
    cfg = from_flat({"model.name": "vgg16", "model.width_mult": 0.125, "data.name": "synthetic",
                     "data.synthetic_shape": "3x16x16"})
    model = build(cfg.model, (3, 16, 16), 10)
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(layer.weight.shape, generator=g) < 0.05 for n, layer in prunable_layers(model).items()}
    set_masks(model, masks)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(generator=g)
    path = str(tmp_path / "vgg.safetensors")
    size = export.save(path, model, masks, cfg, (3, 16, 16), 10)
    assert size == os.path.getsize(path) < 0.2 * len(export.dense_bytes(model))
    loaded = export.load(path)
    x = torch.randn(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert any(layer["encoding"] != "dense" for layer in export.read_header(path)["layers"].values())
    figures = latency.measure(loaded, x, rounds=1, batches=(1, 8))
    assert figures["sparse_path"] == latency.NO_SPARSE_PATH
    assert math.isfinite(figures["latency_dense_ms_b1"]) and math.isfinite(figures["latency_dense_ms_b8"])
    assert math.isnan(figures["latency_sparse_ms_b1"]) and math.isnan(figures["latency_ratio_b8"])


def test_sparse_path_computes_what_the_dense_model_does():
    cfg = ModelConfig(width=32, depth=3)
    model = build(cfg, (1, 8, 8), 10, plain=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) < 0.1)
            layer.bias.normal_(generator=g)
    runner = latency.sparse_runner(model)
    assert isinstance(runner, latency.CSRMLP)
    for b in (1, 7):
        x = torch.randn(b, 1, 8, 8, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), model(x), rtol=1e-5, atol=1e-6)
    model.blocks[0].skip_alpha = 0.5  # mid post-pruning: not the plain network, so no sparse path
    assert latency.sparse_runner(model) is None
    off = latency.measure(build(cfg, (1, 8, 8), 10, plain=True), torch.randn(3, 1, 8, 8), rounds=0)
    assert all(math.isnan(off[k]) for k in FIGURES[2:] if k != "latency_threads")
    assert "not measured" in off["sparse_path"]


def test_latency_rounds_is_not_part_of_a_runs_identity():
    cfg = Config()
    assert run_key(cfg.replace(**{"train.latency_rounds": 0})) == run_key(cfg)
    assert run_key(cfg) == run_key(from_flat({}))  # the new field's default renames no old run
    with pytest.raises(ValueError, match="train.latency_rounds"):
        cfg.replace(**{"train.latency_rounds": -1})


def test_an_exports_bytes_depend_on_the_runs_identity_only():
    """Two runs with one run_key write the same file: where and how a run was tested is not in its header."""
    model = build(ModelConfig(width=16, depth=2), (1, 8, 8), 10, plain=True)
    masks = {name: torch.ones_like(layer.weight) for name, layer in prunable_layers(model).items()}
    cfg = Config()
    blobs = {export.to_bytes(model, masks, c, (1, 8, 8), 10) for c in (
        cfg, cfg.replace(**{"train.fail_at_epoch": 12345, "train.device": "cpu", "data.dir": "/a/much/longer/path",
                            "train.eval_batch_size": 7, "train.latency_rounds": 0, "data.download": True}))}
    assert len(blobs) == 1
    assert len({export.to_bytes(model, masks, cfg.replace(seed=12345), (1, 8, 8), 10)} | blobs) == 2


def test_load_refuses_other_and_damaged_files(tmp_path, digits_run):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        export.load(str(text))
    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a sparse_core export"):
        export.load(plain)
    _, _, path = digits_run
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    meta = json.loads(header["__metadata__"]["sparse_core"])
    meta["version"] = 99
    header["__metadata__"]["sparse_core"] = json.dumps(meta)
    newer = tmp_path / "newer.safetensors"
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    newer.write_bytes(struct.pack("<Q", len(head)) + head + blob[8 + n:])
    with pytest.raises(ValueError, match="version 99"):
        export.load(str(newer))


def test_cli_export_writes_the_file_and_the_figures(tmp_path):
    path = tmp_path / "m.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sparse_core", "model.width=16", "model.depth=2", "prune.density=0.1",
                           *(f"{k}={v}" for k, v in SHORT.items()), "--export", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(FIGURES) <= set(result) and result["model_bytes_sparse"] == path.stat().st_size
    assert f"exported {path}" in proc.stderr
    assert export.read_header(str(path))["run_key"] == result["run_key"]


def test_cli_export_to_an_unwritable_place_fails_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparse_core", "--export", str(tmp_path / "no" / "such" / "m.st")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --export") and "writable directory" in lines[0]


def test_figures_reach_mlflow_and_analysis(tmp_path, capsys):
    """Runs through the sweep's MLflow writer (as sweeps/trainable.py does, export included), then the
    analysis table and plot of size and latency against density."""
    import sparse_core
    from analysis import efficiency
    from analysis.cli import main as analysis_main
    from analysis.load import load_runs
    from sweeps import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id = tracking.experiment_id(uri, "eff")
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for density in (0.3, 0.05):
        cfg = from_flat({**SHORT, "model.width": 16, "model.depth": 2, "prune.density": density})
        mlrun = tracking.TrialRun(uri, exp_id, sweep="s", cell="base", flat=cfg.to_flat(), run_key=run_key(cfg),
                                  tags={"sparse_core_version": sparse_core.__version__}).open()
        path = str(tmp_path / f"{density}" / tracking.EXPORT_ARTIFACT)
        result = run(cfg, lambda metrics, _: mlrun.log_step(metrics), export_path=path)
        mlrun.log_export(path)
        mlrun.finish(result)
        results[density] = (result, mlrun.run_id)
    torch.set_num_threads(threads)
    client = tracking.client(uri)
    for density, (result, run_id) in results.items():
        logged = client.get_run(run_id).data
        finals = runstore.final_metrics(logged.metrics, logged.tags)  # results are tags final/<key>
        for key in FIGURES:
            assert finals[key] == pytest.approx(result[key]), key
        assert logged.tags["sparse_path"] == latency.SPARSE_PATH
        artifact = client.download_artifacts(run_id, tracking.EXPORT_ARTIFACT, str(tmp_path / "dl" / str(density)))
        with open(artifact, "rb") as f, open(str(tmp_path / f"{density}" / tracking.EXPORT_ARTIFACT), "rb") as g:
            assert f.read() == g.read()
    table = efficiency.efficiency_table(load_runs(uri, ["eff"]))
    assert list(table["density"]) == [0.3, 0.05] and list(table["runs"]) == [1, 1]
    for _, row in table.iterrows():
        result = results[row["density"]][0]
        assert row["size ratio"] == pytest.approx(result["model_bytes_sparse"] / result["model_bytes_dense"])
        assert row["latency ratio b256"] == pytest.approx(result["latency_ratio_b256"])
    assert table["size ratio"].iloc[1] < table["size ratio"].iloc[0]  # sparser, smaller
    notes = efficiency.break_even(table)
    assert len(notes) == 2 and all("sparse inference" in n and "1 CPU thread" in n for n in notes)
    out = tmp_path / "plots"
    assert analysis_main(["plot", "--experiment", "eff", "--mlflow-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("efficiency.png", "efficiency.pdf", "efficiency.md"):
        assert str(out / name) in printed and (out / name).stat().st_size > 100
    assert (out / "efficiency.md").read_text().startswith("| model | density | runs | size ratio |")


@pytest.mark.slow  # ~1 min: a local Ray runtime and a 2-trial sweep
def test_sweep_export_logs_each_trials_model_as_an_artifact(tmp_path):
    from sweeps import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "sweeps/ablation_grid.py", "--preset", "smoke", "--cells", "base,rigl",
                           "--densities", "0.01", "--export", "--mlflow-uri", uri, "--experiment", "exp",
                           "--storage-path", str(tmp_path / "ray")], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = [r for r in tracking.search(uri, "exp", "attributes.status = 'FINISHED'")
                if r.data.tags.get("cell") in ("base", "rigl")]  # not the sweep's report run
    assert len(finished) == 2
    client = tracking.client(uri)
    for r in finished:
        final = runstore.final_metrics(r.data.metrics, r.data.tags)  # the results, at full precision
        path = client.download_artifacts(r.info.run_id, tracking.EXPORT_ARTIFACT, str(tmp_path / r.info.run_id))
        assert os.path.getsize(path) == final["model_bytes_sparse"]
        cfg = from_flat(export.read_header(path)["config"])
        assert run_key(cfg) == r.data.tags["run_key"]
        data = load_data(cfg.data)
        acc, _ = evaluate(export.load(path), data.x_test, data.y_test, cfg.train.eval_batch_size)
        assert acc == pytest.approx(final["test_acc"], abs=1e-12)
        assert r.data.tags["sparse_path"] == latency.SPARSE_PATH


def test_interleaved_blocks_alternate_and_count_every_call():
    """The one timing loop (sparse_core.latency.interleaved; benchmarks/timing.py re-exports it)."""
    import benchmarks.timing as bench_timing

    assert bench_timing.interleaved is latency.interleaved
    log = []
    variants = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    times = latency.interleaved(variants, rounds=3, block={"a": 2, "b": 1}, warmup=1, sync=lambda: log.append("|"))
    assert "".join(log) == "ab|" + "|aa|" + "|b|" + "|b|" + "|aa|" + "|aa|" + "|b|"
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in times.values() for t in v)
    assert set(latency.timed_pair(lambda: None, lambda: None, rounds=2)) == {"dense", "sparse", "ratio"}
