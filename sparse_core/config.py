"""One frozen configuration tree with a flat, dotted view.

The flat keys (``prune.density``) are the single vocabulary of the project: CLI overrides,
Ray Tune's param_space, MLflow params and the analysis columns all use them. ``run_key`` is
a short hash of the values that differ from the defaults, so adding a field whose default
is "off" never renames an existing run (OpenLTH's trick).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .fields import PACK, PLACE, POST, PRE, Role, check_choices, flat_fields, keys_where, knob, registry_keys
from .fields import require_decided


def _check(key: str, value: Any, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is not valid; it must be {what}")


@dataclass(frozen=True)
class DataConfig:
    name: str = knob("digits", "dataset: digits (bundled, no download) | mnist | cifar10 | synthetic",
                               PRE, registry="datasets")
    dir: str = knob("data", "where mnist/cifar10 live (torchvision layout: <dir>/MNIST/raw, <dir>/cifar-10-batches-py)",
                            PLACE)
    download: bool = knob(False, "allow torchvision to download mnist/cifar10 into `dir` (needs internet)", PLACE)
    augment: bool = knob(True, "random crop (pad 4) + horizontal flip for cifar10; ignored for the others", PRE)
    synthetic_train: int = knob(512, "synthetic: number of training samples", PRE)
    synthetic_test: int = knob(256, "synthetic: number of test samples", PRE)
    synthetic_shape: str = knob("1x8x8", "synthetic: CxHxW of one input", PRE)
    synthetic_classes: int = knob(10, "synthetic: number of classes", PRE)
    val_size: int = knob(-1, "validation images carved from the training set by a fixed permutation (never moves with "
                             "seed or method); -1 = the data set's standard: digits 144 of 1,437, mnist 5,000 "
                             "(55k/5k), cifar10 5,000 (45k/5k), synthetic (or a set too small for its standard) 10 %",
                             PRE)

    def __post_init__(self):
        _check("data.val_size", self.val_size, self.val_size == -1 or self.val_size >= 1,
               "-1 (the data set's standard split) or >= 1 (selection needs a validation split)")
        _check("data.synthetic_train", self.synthetic_train, self.synthetic_train > 0, "> 0")
        _check("data.synthetic_test", self.synthetic_test, self.synthetic_test > 0, "> 0")
        _check("data.synthetic_classes", self.synthetic_classes, self.synthetic_classes >= 2, ">= 2")
        parts = self.synthetic_shape.split("x")
        _check("data.synthetic_shape", self.synthetic_shape,
               len(parts) == 3 and all(p.isdigit() and int(p) > 0 for p in parts), "of the form CxHxW, e.g. 3x32x32")


@dataclass(frozen=True)
class ModelConfig:
    name: str = knob("mlp", "architecture: mlp | vgg16 | vit", PRE, registry="models")
    width: int = knob(100, "mlp: units per hidden layer; vit: embedding width", PRE)
    depth: int = knob(5, "mlp: number of hidden layers; vit: number of transformer blocks", PRE)
    width_mult: float = knob(1.0, "vgg16: channel multiplier (0.25 = a quarter of every layer's channels)", PRE)
    heads: int = knob(4, "vit: attention heads (must divide model.width)", PRE)
    patch: int = knob(0, "vit: patch side in pixels (0 = 2 for images of at most 16 pixels a side, else 4)", PRE)

    def __post_init__(self):
        _check("model.width", self.width, 1 <= self.width <= 65536, "in [1, 65536]")
        _check("model.depth", self.depth, 1 <= self.depth <= 1024, "in [1, 1024]")
        _check("model.width_mult", self.width_mult, 0 < self.width_mult <= 4, "in (0, 4]")
        _check("model.heads", self.heads, 1 <= self.heads <= 1024, "in [1, 1024]")
        _check("model.patch", self.patch, 0 <= self.patch <= 1024, "0 (auto) or in [1, 1024]")


@dataclass(frozen=True)
class InitConfig:
    name: str = knob("kaiming", "weight init: kaiming (Kaiming-normal) | zero (ZerO, deterministic Hadamard/identity)",
                                PRE, registry="inits")
    sparse_scale: bool = knob(True, "kaiming weights that start sparse (RigL, pruning at init, prune.reinit) are "
                                    "scaled by 1/sqrt(layer density) to keep the dense activation variance (Evci et "
                                    "al. 2022)", PRE)


@dataclass(frozen=True)
class MaskConfig:
    kind: str = knob("none", "learned mask during pre-training: none | sigmoid (continuous sparsification) | "
                             "hardconcrete (L0, Louizos et al.) | gates (Srinivas et al.)", PRE, registry="mask_kinds")
    init: float = knob(0.0, "sigmoid: initial mask score s0, jittered by N(0, 0.01^2) (m = sigmoid(beta s) / "
                            "sigmoid(s0) starts at 1; p = 0.5 at 0, where the sigmoid is steepest)", PRE)
    gate_init: float = knob(1.0, "gates: initial gate value in [0, 1] (1 = every weight starts switched on)", PRE)
    beta_final: float = knob(300.0, "sigmoid: temperature beta rises geometrically from 1 to this over the "
                                    "pre-training steps", PRE)
    target: bool = knob(True, "sigmoid, hardconcrete: steer the mask's density to prune.density over pre-training "
                              "(augmented Lagrangian, multiplier by dual ascent); false = constant L1 pressure "
                              "lambda_l1 * sum(p)", PRE)
    warmup: float = knob(0.3, "sigmoid, hardconcrete: fraction of pre-training over which the target density falls "
                              "geometrically from the mask's initial expected density to prune.density (held after)",
                              PRE)
    dual_lr: float = knob(1.0, "sigmoid, hardconcrete: dual-ascent step of the multiplier per optimizer step, relative "
                               "to the target (lambda += dual_lr (d - t) / t)", PRE)
    rho: float = knob(1500.0, "sigmoid, hardconcrete: weight of the augmented Lagrangian's quadratic term rho / (2 t) "
                              "(d - t)^2 (d, t: density and target, fractions)", PRE)
    lambda_l1: float = knob(1e-4, "gates, and sigmoid/hardconcrete with target=false: L1 pressure on each mask entry "
                                  "(the loss adds lambda * sum(p))", PRE)
    lambda_bin: float = knob(1e-4, "gates: weight of the binarity penalty sum(g * (1 - g))", PRE)
    lr: float = knob(0.1, "learning rate of the mask scores (own parameter group, the weights' optimizer and momentum, "
                          "no weight decay)", PACK)

    def __post_init__(self):
        _check("mask.init", self.init, -20 <= self.init <= 20, "in [-20, 20]")
        _check("mask.beta_final", self.beta_final, self.beta_final >= 1, ">= 1")
        _check("mask.warmup", self.warmup, 0 < self.warmup <= 1, "in (0, 1]")
        _check("mask.dual_lr", self.dual_lr, self.dual_lr >= 0, ">= 0")
        _check("mask.rho", self.rho, self.rho >= 0, ">= 0")
        _check("mask.lambda_l1", self.lambda_l1, self.lambda_l1 >= 0, ">= 0")
        _check("mask.lambda_bin", self.lambda_bin, self.lambda_bin >= 0, ">= 0")
        _check("mask.lr", self.lr, self.lr > 0, "> 0")
        _check("mask.gate_init", self.gate_init, 0 <= self.gate_init <= 1, "in [0, 1]")


@dataclass(frozen=True)
class PruneConfig:
    density: float = knob(0.1, "fraction of prunable weights KEPT (0.01 = 1 % remain); 1.0 = no pruning", PACK)
    pruner: str = knob("magnitude", "score: magnitude | random | mask | snip | grasp | synflow",
                                    POST, registry="pruners")
    scope: str = knob("global", "how scores become masks: global (one threshold) | layerwise | erk",
                                POST, registry="scopes")
    rounds: int = knob(1, "1 = one-shot; n > 1 = iterative, density_k = density^(k/n)", POST)
    gradual_epochs: int = knob(0, "GMP (Zhu & Gupta 2017): epochs after pre-training in which the mask is re-pruned "
                                  "every gradual_every steps on the cubic schedule from 1 to density (0 = off)", POST)
    gradual_every: int = knob(10, "gradual: optimizer steps between pruning steps", POST)
    rescale: str = knob("auto", "after pruning a trained network: auto (the pruner's registered choice: data for "
                                "random, none for the rest, as measured) | none | sqrt (kept weights x sqrt(kept "
                                "before / kept after)) | data (per layer, restore the pre-activation std of the "
                                "unpruned network on the scoring batch)",
                                POST, choices=("auto", "none", "sqrt", "data"))
    round_epochs: int = knob(0, "training epochs between iterative rounds (iterative magnitude pruning)", POST)
    rewind_epoch: int = knob(-1, "after each round rewind kept weights to their value after this pre-training epoch "
                                 "(-1 = no rewind, 0 = init)", PRE)
    samples_per_class: int = knob(10, "snip/grasp: scoring batch = this many training samples per class (fixed, "
                                      "seeded)", POST)
    grasp_temperature: float = knob(200.0, "grasp: softmax temperature of the Hessian-gradient product", POST)
    shuffle: bool = knob(False, "sanity control: permute each layer's mask after pruning (same per-layer counts)", POST)
    reinit: bool = knob(False, "sanity control: re-initialise kept weights after pruning (with init.name)", POST)

    def __post_init__(self):
        _check("prune.density", self.density, 0 < self.density <= 1, "in (0, 1] (the fraction of weights kept)")
        _check("prune.rounds", self.rounds, self.rounds >= 1, ">= 1")
        _check("prune.round_epochs", self.round_epochs, self.round_epochs >= 0, ">= 0")
        _check("prune.rewind_epoch", self.rewind_epoch, self.rewind_epoch >= -1, ">= -1")
        _check("prune.samples_per_class", self.samples_per_class, self.samples_per_class >= 1, ">= 1")
        _check("prune.grasp_temperature", self.grasp_temperature, self.grasp_temperature > 0, "> 0")
        _check("prune.gradual_epochs", self.gradual_epochs, self.gradual_epochs >= 0, ">= 0")
        _check("prune.gradual_every", self.gradual_every, self.gradual_every >= 1, ">= 1")
        check_choices("prune", self)


@dataclass(frozen=True)
class PostConfig:
    label_smoothing: bool = knob(False, "post-training loss uses label smoothing (1-a on the true class, a/(C-1) "
                                        "elsewhere)", POST)
    smoothing: float = knob(0.1, "a, the smoothing mass", POST)
    soft_activation: bool = knob(False, "activation blends SiLU -> ReLU over the first soft_fraction of post-training",
                                        POST)
    soft_skip: bool = knob(False, "decaying identity skips alpha*P(x) on every hidden layer, gone after soft_fraction",
                                  POST)
    soft_fraction: float = knob(0.5, "fraction of post-training over which the soft schedules run (then plain network)",
                                     POST)
    skip_alpha0: float = knob(1.0, "initial skip weight alpha, decays linearly to 0", POST)

    def __post_init__(self):
        _check("post.smoothing", self.smoothing, 0 <= self.smoothing < 1, "in [0, 1)")
        _check("post.soft_fraction", self.soft_fraction, 0 < self.soft_fraction <= 1, "in (0, 1]")
        _check("post.skip_alpha0", self.skip_alpha0, self.skip_alpha0 >= 0, ">= 0")


@dataclass(frozen=True)
class RiglConfig:
    delta_t: int = knob(100, "optimizer steps between mask updates", POST)
    alpha: float = knob(0.3, "initial drop fraction; f(t) = alpha/2 * (1 + cos(pi t / T_end))", POST)
    end_fraction: float = knob(0.75, "mask updates stop after this fraction of training steps", POST)
    distribution: str = knob("erk", "per-layer density of the random sparse start: erk | uniform",
                                    POST, choices=("erk", "uniform"))
    start: str = knob("random", "the sparse start: random (per rigl.distribution) | a pruner scoring the network at "
                                "init (snip, synflow, grasp, magnitude: prune.scope, prune.rounds rounds)", PRE)
    start_density: float = knob(0.0, "GraNet-style gradual start: begin at this density (> prune.density) and prune by "
                                     "magnitude to prune.density on a cubic schedule over the drop/grow updates; 0 = "
                                     "start at prune.density", PRE)

    def __post_init__(self):
        _check("rigl.delta_t", self.delta_t, self.delta_t >= 1, ">= 1")
        _check("rigl.alpha", self.alpha, 0 < self.alpha < 1, "in (0, 1)")
        _check("rigl.end_fraction", self.end_fraction, 0 < self.end_fraction <= 1, "in (0, 1]")
        check_choices("rigl", self)
        _check("rigl.start_density", self.start_density, 0 <= self.start_density <= 1, "0 (off) or in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    method: str = knob("prune", "prune (init -> pre-train -> prune -> post-train) | rigl (dynamic sparse from the "
                                "start)", PRE, choices=("prune", "rigl"))
    pre_epochs: int = knob(10, "dense (or learned-mask) epochs before pruning", PRE)
    post_epochs: int = knob(20, "epochs after pruning with the mask fixed", POST)
    optimizer: str = knob("sgd", "sgd (with momentum) | adam", PRE, choices=("sgd", "adam"))
    lr: float = knob(0.05, "peak learning rate of every training stage", PACK)
    momentum: float = knob(0.9, "sgd momentum", PRE)
    weight_decay: float = knob(5e-4, "L2 weight decay (not applied to mask scores)", PACK)
    schedule: str = knob("cosine", "per-stage lr schedule: cosine (to 0) | constant | step (x0.1 at 50 % and 75 %)",
                                   PRE, choices=("cosine", "constant", "step"))
    batch_size: int = knob(64, "training batch size", PRE)
    eval_batch_size: int = knob(1024, "batch size for evaluation and scoring", PLACE)
    device: str = knob("auto", "auto (cuda if available) | cpu | cuda | cuda:N", PLACE)
    amp: bool = knob(False, "bf16 autocast on CUDA (ignored on CPU)", PRE)
    channels_last: bool = knob(False, "channels-last memory format for conv models on CUDA", PRE)
    fail_at_epoch: int = knob(-1, "TESTING ONLY: raise when global epoch k >= 2 starts, in a run not resumed from a "
                                  "checkpoint (-1 = never)", PLACE)
    latency_rounds: int = knob(5, "timed rounds of the CPU inference latency (dense vs sparse) measured after every "
                                  "run; 0 = skip it (never changes accuracy)",
                                  Role(identity=False, packable=False, post_fork=True))

    def __post_init__(self):
        check_choices("train", self)
        _check("train.pre_epochs", self.pre_epochs, 0 <= self.pre_epochs <= 100_000, "in [0, 100000]")
        _check("train.post_epochs", self.post_epochs, 0 <= self.post_epochs <= 100_000, "in [0, 100000]")
        _check("train.lr", self.lr, self.lr > 0, "> 0")
        _check("train.momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)")
        _check("train.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check("train.batch_size", self.batch_size, 1 <= self.batch_size <= 2**20, "in [1, 1048576]")
        _check("train.eval_batch_size", self.eval_batch_size, 1 <= self.eval_batch_size <= 2**20, "in [1, 1048576]")
        _check("train.latency_rounds", self.latency_rounds, 0 <= self.latency_rounds <= 10_000, "in [0, 10000]")
        _check("train.fail_at_epoch", self.fail_at_epoch, self.fail_at_epoch == -1 or self.fail_at_epoch >= 2,
               "-1 (never) or >= 2 (epoch 1 has no checkpoint to retry from)")
        ok = self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        _check("train.device", self.device, ok, "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    post: PostConfig = field(default_factory=PostConfig)
    rigl: RiglConfig = field(default_factory=RiglConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = knob(0, "the one seed every generator (data order, init, pruning, rigl) derives from", PACK)

    def __post_init__(self):
        """Every rule that ties two fields together lives here, so a sweep's pre-flight (which builds a
        Config per trial) catches all of them before any trial starts."""
        if self.prune.pruner == "mask" and self.mask.kind == "none" and self.train.method == "prune":
            raise ValueError("prune.pruner='mask' needs a learned mask: set mask.kind to sigmoid or gates")
        if self.train.method == "rigl" and self.mask.kind != "none":
            raise ValueError(f"mask.kind={self.mask.kind!r} is a pre-training mask; train.method='rigl' has "
                             f"no pre-training: set mask.kind=none")
        if self.prune.gradual_epochs and self.prune.rounds > 1:
            raise ValueError(f"prune.gradual_epochs={self.prune.gradual_epochs} (cubic schedule) and "
                             f"prune.rounds={self.prune.rounds} (exponential rounds) are two schedules: set one")
        if self.mask.kind != "none" and self.train.pre_epochs == 0:
            raise ValueError(f"mask.kind={self.mask.kind!r} learns during pre-training: set train.pre_epochs >= 1")
        if self.prune.rewind_epoch > self.train.pre_epochs:
            raise ValueError(f"prune.rewind_epoch={self.prune.rewind_epoch} is after pre-training "
                             f"(train.pre_epochs={self.train.pre_epochs})")

    # ---- flat view -------------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        return to_flat(self)

    def replace(self, **flat: Any) -> "Config":
        """A copy with dotted-key overrides, e.g. ``cfg.replace(**{"prune.density": 0.01})``."""
        return from_flat({**self.to_flat(), **flat})


def to_flat(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            out[f.name] = value
    return out


FIELD_TYPES = {key: type(value) for key, value in to_flat(Config()).items()}


def parse_bool(value: Any) -> bool | None:
    """``true/1/yes/on`` -> True, ``false/0/no/off`` -> False (strings in any case, bools, the numbers 0 and 1),
    anything else None: the one reading of a boolean (CLI, MLflow params, analysis filters)."""
    if isinstance(value, str):
        low = value.strip().lower()
        return True if low in ("true", "1", "yes", "on") else False if low in ("false", "0", "no", "off") else None
    return bool(value) if isinstance(value, (int, float)) and value in (0, 1) else None


def _parse(key: str, value: Any, typ: type) -> Any:
    """Coerce a value (possibly a string from the CLI or MLflow, or a numpy scalar from a
    DataFrame) to the field's type."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    if typ is bool:
        if parse_bool(value) is None:
            raise ValueError(f"{key}={value!r} is not valid; it must be true or false")
        return parse_bool(value)
    try:
        if typ is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
        if typ is float:
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{key}={value!r} is not valid; it must be a {typ.__name__}")


def from_flat(flat: Mapping[str, Any]) -> Config:
    """Inverse of ``to_flat``; missing keys take their defaults, unknown keys are errors.

    Values may be strings (CLI, MLflow params), which are parsed to the field's type.
    """
    unknown = sorted(set(flat) - set(FIELD_TYPES))
    if unknown:
        import difflib

        def closest(key: str) -> str:  # same field name in another section first, then spelling: three at most
            same = [k for k in FIELD_TYPES if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
            score = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in FIELD_TYPES}
            near = same + [k for k in sorted(score, key=score.get, reverse=True) if k not in same]
            return f"{key} (did you mean {' or '.join(near[:3])}?)"

        raise ValueError(f"unknown config key(s): {', '.join(map(closest, unknown))}; every key with its meaning: "
                         f"python -m sparse_core --help")
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        parsed = _parse(key, value, FIELD_TYPES[key])
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = parsed
        else:
            top[key] = parsed
    kwargs: dict[str, Any] = dict(top)
    for f in fields(Config):
        if f.name in sections:
            kwargs[f.name] = f.default_factory(**sections[f.name])  # type: ignore[misc]
    return Config(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["prune.density=0.01", ...]`` -> ``{"prune.density": "0.01"}``."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. prune.density=0.01")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# The lists the rest of the code reads, derived from the fields' declarations above (``sparse_core.fields``).
require_decided(Config)  # a field without a role or help stops the import, naming it
NOT_IDENTITY = keys_where(Config, lambda r: not r.identity)  # never change a result: left out of run_key
PACKABLE = keys_where(Config, lambda r: r.packable)  # copies of one pack may differ in these (packed.pack_key)
POST_FORK = keys_where(Config, lambda r: r.post_fork)  # read only from the first pruning step on (prefix.prefix_key)
# Names checked against the registries (registries import torch; config must not need to, so that sweeps can
# validate a grid cheaply): ``sparse_core.checks.validate_names`` does that check.
REGISTRY_KEYS = registry_keys(Config)


# Bumped when the same settings stop meaning the same experiment. 2: the validation split (training
# sets lost their validation images) and the learned-mask defaults (mask.init, target steering) changed;
# 3: the learned mask became a rescaled mask steered by a Lagrange multiplier (mask.init 0, mask.lr),
# so no run of an older version may be taken for a finished run of this one.
PROTOCOL = 3


def run_key(cfg: Config) -> str:
    """Short stable hash of the settings that differ from the defaults (12 hex chars)."""
    defaults = to_flat(Config())
    changed = {k: v for k, v in to_flat(cfg).items() if v != defaults[k] and k not in NOT_IDENTITY}
    blob = json.dumps(changed, sort_keys=True, separators=(",", ":"))
    if PROTOCOL > 1:
        blob = f"v{PROTOCOL}:{blob}"
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every flat key, from the fields' declarations."""
    return [(key, f.default, f.metadata["help"]) for key, f in flat_fields(Config)]
