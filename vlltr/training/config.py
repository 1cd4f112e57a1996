"""Run configuration: typed dataclasses loaded from YAML, with `--set key=value` overrides.

A config file holds the sections below; anything not given takes the default written here. Unknown keys,
and values outside a key's listed choices, are an error (a typo must not silently fall back to a default or
fail hours into a run). The resolved config is saved next to every
checkpoint, so a run can always be reproduced and resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from vlltr.errors import ConfigError


@dataclass
class ModelCfg:
    arch: str = "vlltr-tiny-vit"  # any open_clip architecture (`vlltr models` lists them)
    pretrained: str | None = None  # open_clip tag (needs network) or local checkpoint path; None = random init
    quick_gelu: bool = False  # OpenAI weights need QuickGELU; open_clip sets it for `openai` tags itself


@dataclass
class DataCfg:
    """Where a dataset lives and how its files are laid out. Paths are relative to `root`."""

    name: str = "dataset"  # a label for reports only; never used to pick behaviour
    root: str = ""
    format: Literal["listfile", "inat", "folder"] = "listfile"
    image_root: str = "."  # images are resolved as root/image_root/relpath
    train: str = "train.txt"  # list file (listfile), JSON (inat) or folder (folder)
    val: str | None = "val.txt"
    test: str | None = "test.txt"
    # Class names: `lines` (one name per line, line = class id), `imagenet_labels` (`wnid idx name`),
    # `places_labels` (`name idx`), `inat_categories` (official categories.json).
    class_names: str = "classes.txt"
    class_names_format: Literal["lines", "imagenet_labels", "places_labels", "inat_categories"] = "lines"
    text_dir: str = "text"  # one text file per class
    text_pattern: str = "desc_{id}.txt"  # `{id}` = class index, `{name}` = class name
    templates: Literal["clip80", "simple", "none"] = "clip80"  # prompt sentences added to each class's text
    drop_sections: list[str] = field(
        default_factory=lambda: ["External links", "References", "Further reading", "Bibliography", "See also"]
    )
    heldout: str | None = None  # file of class ids kept out of training (added later by text)
    # Shot groups by training count (OLTR: many > 100, few < 20); the original code's groups are also reported.
    many_threshold: int = 100
    few_threshold: int = 20
    # Evaluation preprocessing: resize shorter side to round(image_size * resize_ratio), centre crop.
    resize_ratio: float = 256 / 224
    # Decode JPEGs whose shorter side is over 4x the resize size at 1/2-1/8 scale (libjpeg DCT scaling), in the
    # evaluation transform here and in the service: several times cheaper to serve large photos, and since
    # training evaluates the same way, the served pixels stay the evaluated ones.
    jpeg_draft: bool = False
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    augment: Literal["clip", "light", "none"] = "clip"  # clip = RRC + flip + RandAugment m9 + erasing 0.25
    num_workers: int = 2


@dataclass
class Stage1Cfg:
    epochs: int = 50
    batch_size: int = 256  # per process
    lr: float = 5e-5
    min_lr: float = 0.0
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    smoothing: float = 0.1
    distill_beta: float = 0.5  # 0 switches distillation (and the teacher) off
    # Multiplier on the text tower's lr (1: the paper's one shared lr; 0 freezes the text tower). Lower values lean
    # more on what the class text says and, on the long-tail benchmark, cost accuracy (docs/benchmarks/shapes-lt.md).
    text_lr_scale: float = 1.0
    bn_train_mode: bool = False  # the original trains IN-LT/Places in eval mode (frozen BN)
    sampler: Literal["sqrt", "balanced", "instance"] = "sqrt"
    amp: bool = True  # fp16 autocast + grad scaling on CUDA; ignored on CPU (bf16 autocast is slower there)
    eps: float = 1e-8  # AdamW epsilon
    lr_unit: Literal["epoch", "iter"] = "epoch"  # the original steps the cosine once per epoch
    monitor_every: int = 1  # epochs between val nearest-sentence accuracy checks (0 = never)


@dataclass
class AnssCfg:
    num_anchors: int = 64  # M
    reference_split: Literal["val", "train"] = "val"
    max_images_per_class: int = 50
    chunk_size: int = 4096  # sentences scored per matmul
    mode: Literal["anss", "rand", "first"] = "anss"  # rand / first: the paper's ablation baselines


@dataclass
class Stage2Cfg:
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3  # MLP branch
    attn_lr: float = 1e-6  # LN_q, LN_k, W_q, W_k
    backbone_lr: float = 2e-5
    train_backbone: bool = False
    min_lr: float = 0.0
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    eps: float = 1e-8
    lr_unit: Literal["epoch", "iter"] = "epoch"
    loss: Literal["ce", "logit_adjusted"] = "ce"  # published: CE; logit_adjusted = Balanced Softmax style
    la_tau: float = 1.0
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_switch_prob: float = 0.5
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    smoothing: float = 0.1
    alpha: float = 0.2  # fusion weight of the vision branch
    v_detach: bool = False
    sampler: Literal["sqrt", "balanced", "instance"] = "sqrt"
    amp: bool = True


@dataclass
class EvalCfg:
    split: str = "test"
    calibration_split: str = "val"
    ece_bins: int = 15
    batch_size: int = 256
    calibrate: bool = True
    tau_max: float = 2.0  # post-hoc logit adjustment grid [0, tau_max]
    tau_step: float = 0.05
    # γ for classes added by text after training (training/added_classes.py): fitted on up to `pseudo_new`
    # rare trained classes treated as new, costing the others at most `added_class_max_cost` points.
    fit_added_classes: bool = True
    pseudo_new: int = 8
    added_class_max_cost: float = 1.5


@dataclass
class RunCfg:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 50
    checkpoint_every: int = 1  # epochs
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    stage1: Stage1Cfg = field(default_factory=Stage1Cfg)
    anss: AnssCfg = field(default_factory=AnssCfg)
    stage2: Stage2Cfg = field(default_factory=Stage2Cfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{where}.{k}'.lstrip('.') for k in unknown]}; known: {sorted(fields)}")
    kwargs = {}
    hints = get_type_hints(cls)
    for name, value in values.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[name] = _build(sub, value, f"{where}.{name}".lstrip("."))
        else:
            if get_origin(hints[name]) is Literal and value not in get_args(hints[name]):
                raise ConfigError(
                    f"{f'{where}.{name}'.lstrip('.')}: {value!r} is not one of {list(get_args(hints[name]))}"
                )
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested dicts, rejecting unknown keys."""
    return _build(Config, values or {}, "")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path, or a bundled config's name like `shapes-lt-tiny`) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        resolved = resolve_config_path(path)
        values = yaml.safe_load(resolved.read_text()) or {}
    return config_from_dict(apply_overrides(values, overrides or []))


BUNDLED_CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the stem of a config shipped in `training/configs/`."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = BUNDLED_CONFIG_DIR / f"{p.name}.yaml" if p.suffix == "" else BUNDLED_CONFIG_DIR / p.name
    if bundled.is_file():
        return bundled
    known = sorted(c.stem for c in BUNDLED_CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(path)!r} not found (bundled configs: {known})")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
