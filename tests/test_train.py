import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sparse_core.config import Config, DataConfig
from sparse_core.data import TensorData, crop_flip, load, train_batches
from sparse_core.train import InjectedFailure, RunState, fit, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"train.pre_epochs": 2, "train.post_epochs": 2, "prune.density": 0.05}


def _cli(*args, cwd=ROOT, timeout=900):  # generous: the machine is shared and busy
    return subprocess.run([sys.executable, "-m", "sparse_core", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_same_config_twice_gives_identical_masks_and_accuracy():
    cfg = Config().replace(**FAST, **{"prune.pruner": "snip", "post.soft_skip": True})
    a, b = RunState(cfg), RunState(cfg)
    ra, rb = fit(a), fit(b)
    assert ra["test_acc"] == rb["test_acc"] and ra["history"] == rb["history"]
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    other = RunState(cfg.replace(seed=1))
    fit(other)
    assert any(not torch.equal(a.masks[n], other.masks[n]) for n in a.masks)


def test_changing_the_pruner_does_not_change_the_data_order():
    seen = {}
    for pruner in ("magnitude", "random"):
        t = RunState(Config().replace(**FAST, **{"prune.pruner": pruner}))
        fit(t)
        seen[pruner] = t.gen["data"].get_state()
    assert torch.equal(seen["magnitude"], seen["random"])


@pytest.mark.parametrize("flat", [
    {"prune.pruner": "magnitude", "prune.rounds": 2, "prune.round_epochs": 1, "prune.rewind_epoch": 1},
    {"mask.kind": "sigmoid", "prune.pruner": "mask", "post.soft_activation": True, "train.optimizer": "adam",
     "train.lr": 0.003},
    {"train.method": "rigl", "rigl.delta_t": 10},
    {"mask.kind": "hardconcrete", "prune.pruner": "mask", "mask.warmup": 0.9},
], ids=["imp-rewind", "learned-mask-adam", "rigl", "hard-concrete"])
def test_save_at_an_epoch_boundary_and_restore_in_a_fresh_process(tmp_path, flat):
    overrides = [f"{k}={v}" for k, v in {**FAST, **flat}.items()]
    r1 = run(Config().replace(**FAST, **flat))  # uninterrupted
    ckpt = str(tmp_path / "state.pt")
    # first process dies at the start of epoch 3 after saving the state of epoch 2
    first = _cli(*overrides, "train.fail_at_epoch=3", "--checkpoint", ckpt)
    assert first.returncode != 0 and "injected failure" in first.stderr and os.path.exists(ckpt)
    from sparse_core.checkpoint import load_state

    assert load_state(ckpt)["step_idx"] > 0  # the safe loader (weights_only=True) reads what the CLI wrote
    second = _cli(*overrides, "train.fail_at_epoch=3", "--checkpoint", ckpt)  # a fresh process resumes
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr
    r2 = json.loads(second.stdout.splitlines()[-1])
    assert r1["test_acc"] == r2["test_acc"] and r1["layer_density"] == r2["layer_density"]
    assert r1["run_key"] == r2["run_key"]


def test_injected_failure_only_fires_in_a_fresh_run():
    cfg = Config().replace(**FAST, **{"train.fail_at_epoch": 2})
    states = []
    with pytest.raises(InjectedFailure):
        run(cfg, lambda m, c: states.append(c()))
    assert run(cfg, state=states[-1])["epochs"] == 4


def test_cli_digits_mlp_dense_reaches_95_percent_and_prints_the_contract():
    out = _cli("prune.density=1.0")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("run_key", "test_acc", "val_acc", "best_val_acc", "test_acc_at_best_val", "density", "density_target",
                "layer_density",
                "collapsed_layers", "flops_dense", "flops_sparse", "seconds", "config"):
        assert key in result, key
    assert result["test_acc"] >= 0.95
    assert result["density"] == 1.0 and result["flops_sparse"] == result["flops_dense"]
    assert result["config"]["prune.density"] == 1.0
    assert "best_test_acc" not in result  # no selection on test
    assert "[ 30/30] post" in out.stderr  # progress per epoch on stderr, nothing else on stdout
    # the split: 1,437 training images less 144 for validation, and the 360-image test set
    assert "1293 train / 144 validation / 360 test images (1797 in all)" in out.stderr
    assert result["data_sizes"] == {"train": 1293, "val": 144, "test": 360}
    assert len(out.stdout.strip().splitlines()) == 1


def test_cli_sparse_run_reports_density_and_flops():
    out = _cli("prune.density=0.01", "prune.scope=layerwise", "train.pre_epochs=1", "train.post_epochs=1", "--quiet")
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["density"] == pytest.approx(0.01, abs=1e-4) and r["density_target"] == 0.01
    assert all(abs(d - 0.01) < 0.011 for d in r["layer_density"].values())
    assert r["flops_sparse"] < 0.02 * r["flops_dense"]
    assert r["density_all"] > r["density"]  # biases are never pruned


def test_cli_help_lists_every_key_and_bad_input_fails_fast():
    out = _cli("--help")
    from sparse_core.config import to_flat
    for key in to_flat(Config()):
        assert key in out.stdout
    assert "fraction of prunable weights KEPT" in out.stdout
    bad = _cli("prune.pruner=no-such-pruner")
    assert bad.returncode == 2 and "prune.pruner='no-such-pruner'" in bad.stderr and "synflow" in bad.stderr


def test_flops_match_torch_flop_counter_and_hand_count():
    from sparse_core.metrics import flops
    t = RunState(Config().replace(**{"model.name": "vgg16", "model.width_mult": 0.125, "data.name": "synthetic",
                                    "data.synthetic_shape": "3x32x32"}))
    dense, sparse = flops(t.model, (3, 32, 32), {n: torch.ones_like(w, dtype=torch.bool)
                                                 for n, w in t.model.named_parameters() if n.endswith("layer.weight")
                                                 or n == "head.weight"})
    # hand count: 2 * H * W * Cin * Cout * 9 per conv + 2 * 64 * 10 for the head
    plan = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64]
    c, hw, expected = 3, 32, 0
    for item in plan:
        if item == "M":
            hw //= 2
            continue
        expected += 2 * hw * hw * c * item * 9
        c = item
    expected += 2 * 64 * 10
    assert dense == expected and sparse == dense
    from torch.utils.flop_counter import FlopCounterMode  # what the hooks' count stands in for
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        t.model.eval()(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == dense
    mlp = RunState(Config().replace(**{"data.name": "synthetic"}))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        mlp.model.eval()(torch.zeros(1, 1, 8, 8))
    assert flops(mlp.model, (1, 8, 8), {n: torch.ones_like(w, dtype=torch.bool) for n, w in
                                        mlp.model.named_parameters() if n.endswith("weight")})[0] == counter.get_total_flops()


def _write_mnist(root, n_train=50, n_test=20):
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write((2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big"))
            f.write(images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    return images, labels


def _write_cifar(root, per_batch=10):
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 "labels": [int(i) % 10 for i in range(per_batch)], "batch_label": name}
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return batch


def test_mnist_loads_through_torchvision_from_idx_files(tmp_path):
    images, labels = _write_mnist(str(tmp_path))
    data = load(DataConfig(name="mnist", dir=str(tmp_path)))
    # the standard 5,000-image validation split does not fit 50 training images: 10 % of them then
    assert data.x_train.shape == (45, 1, 28, 28) and data.x_val.shape == (5, 1, 28, 28)
    assert data.x_test.shape == (20, 1, 28, 28)
    assert data.y_test.tolist() == labels.tolist()
    assert torch.allclose(data.x_test[3, 0] * 0.3081 + 0.1307, torch.tensor(images[3] / 255.0, dtype=torch.float32),
                          atol=1e-5)
    out = _cli("data.name=mnist", f"data.dir={tmp_path}", "train.pre_epochs=1", "train.post_epochs=1", "--quiet")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["prunable_weights"] == 119_400


def test_cifar10_loads_through_torchvision_from_pickled_batches(tmp_path):
    last = _write_cifar(str(tmp_path))
    data = load(DataConfig(name="cifar10", dir=str(tmp_path)))
    assert data.x_train.shape == (45, 3, 32, 32) and data.x_val.shape == (5, 3, 32, 32)
    assert data.x_test.shape == (10, 3, 32, 32) and data.augment
    raw = torch.tensor(last["data"][0].reshape(3, 32, 32) / 255.0, dtype=torch.float32)
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    assert torch.allclose(data.x_test[0] * std[:, None, None] + mean[:, None, None], raw, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_data_folder_says_where_it_looked_and_how_to_get_it(tmp_path, name):
    with pytest.raises(FileNotFoundError) as e:
        load(DataConfig(name=name, dir=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "data.download=true" in msg
    out = _cli(f"data.name={name}", f"data.dir={tmp_path}/nowhere")
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr


def test_crop_flip_is_a_padded_crop_or_its_mirror():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        found = any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(2))
                    for i in range(5) for j in range(5) for c in [padded[b, :, i:i + 8, j:j + 8]])
        assert found


def test_train_batches_cover_every_sample_once_per_epoch():
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    data = TensorData(x, torch.arange(10), x, torch.arange(10), num_classes=10)
    seen = torch.cat([y for _, y in train_batches(data, 3, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))


def test_vgg16_trains_on_synthetic_images():
    cfg = Config().replace(**{"model.name": "vgg16", "model.width_mult": 0.125, "data.name": "synthetic",
                              "data.synthetic_shape": "3x32x32", "data.synthetic_train": 128, "data.synthetic_test": 64,
                              "train.pre_epochs": 1, "train.post_epochs": 1, "prune.density": 0.1,
                              "prune.pruner": "synflow", "prune.rounds": 3, "prune.scope": "global"})
    r = run(cfg)
    assert r["density"] == pytest.approx(0.1, abs=1e-4) and len(r["layer_density"]) == 14


def test_sparse_core_never_imports_ray_or_mlflow():
    code = textwrap.dedent("""
        import sys
        import sparse_core, sparse_core.cli, sparse_core.train
        from sparse_core.train import run
        from sparse_core.config import Config
        run(Config().replace(**{"train.pre_epochs": 1, "train.post_epochs": 1}))
        bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')]
        assert not bad, bad
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=900)
    for dirpath, _, files in os.walk(os.path.join(ROOT, "sparse_core")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f)).read()
                assert "import ray" not in text and "import mlflow" not in text and "from ray" not in text \
                    and "from mlflow" not in text, f


def test_divergence_is_reported_as_such_not_as_a_pruning_error():
    from sparse_core.train import TrainingDiverged
    cfg = Config().replace(**{"train.lr": 1e6, "train.pre_epochs": 1, "train.post_epochs": 1,
                              "prune.pruner": "synflow"})
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        run(cfg)
    out = _cli("train.lr=1e6", "train.pre_epochs=1", "train.post_epochs=1")
    assert out.returncode == 2 and "diverged" in out.stderr and "Traceback" not in out.stderr


def test_exit_now_keeps_the_exit_code_the_atexit_handlers_and_the_buffered_output():
    """The sweep scripts and ``python -m sparse_core`` end through ``exit_now`` (no interpreter teardown):
    it must still run the atexit handlers (Ray's shutdown, logging's flush), flush what is buffered in
    both streams (a pipe is block-buffered) and exit with the command's code."""
    code = ("import atexit, sys\nfrom sparse_core.cli import exit_now\n"
            "atexit.register(lambda: print('handler ran', end=''))\n"
            "print('summary line', end='')\nprint('a warning', end='', file=sys.stderr)\nexit_now(3)\n"
            "print('never')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": ""})
    assert proc.returncode == 3
    assert proc.stdout == "summary linehandler ran" and proc.stderr == "a warning"
