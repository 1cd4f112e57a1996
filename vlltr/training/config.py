"""Run configuration: typed dataclasses loaded from YAML, with `--set key=value` overrides.

A config file holds the sections below; anything not given takes the default written here. Unknown keys,
values of another type than the key declares (`stage1.epochs: ten`) and values outside a key's listed choices
are an error naming the key (a typo must not silently fall back to a default or fail hours into a run). The
resolved config is saved next to every checkpoint, so a run can always be reproduced and resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

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
    # `places_labels` (`name idx`), `inat_categories` (official categories.json). A folder dataset without
    # `classes.txt` takes the sorted sub-folder names of its train split, as torchvision's ImageFolder does.
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
    # original = the published code's timm transform (rand-m9-mstd0.5-inc1, pixel-noise erasing 0.25); clip = a
    # torchvision approximation of it (RRC + flip + RandAugment m9 + zero erasing 0.25), see data/transforms.py
    augment: Literal["original", "clip", "light", "none"] = "clip"
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
    # The anchors' text vectors: 0 keeps them frozen (published); > 0 trains them at this lr, so the language
    # branch is a text-initialised cosine classifier (LIFT's classifier).
    anchor_lr: float = 0.0
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
    # Weight of the language branch's loss (1: the published unweighted sum). 0 with alpha 1, stage1.epochs 0 and
    # train_backbone is the image-only baseline: the image tower and the vision branch fine-tuned, no class text.
    language_weight: float = 1.0
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
    # The `unknown` verdict (vlltr/model/runtime/unknown.py): its score ("none": no verdict in the bundle) and
    # the share of the calibration split's images its threshold keeps; `typicality` combines `unknown_components`;
    # `mahalanobis` (alone or as a component) fits its class statistics on at most `prototype_images` training
    # images per class (vlltr/training/prototypes.py).
    unknown_score: Literal["vision_energy", "language_cosine", "probability", "mahalanobis", "typicality", "none"] = (
        "typicality"
    )
    unknown_components: list[str] = field(default_factory=lambda: ["vision_energy", "mahalanobis"])
    unknown_keep: float = 0.95
    prototype_images: int = 100


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


def _key(where: str, name: str) -> str:
    return f"{where}.{name}".lstrip(".")


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {[_key(where, k) for k in unknown]}; known: {sorted(fields)}")
    hints = get_type_hints(cls)
    kwargs = {name: _typed(value, hints[name], _key(where, name)) for name, value in values.items()}
    return cls(**kwargs)


def _describe(annotation: Any) -> str:
    """How a type reads in an error message: `an integer`, `a string or null`, `a list of numbers`."""
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, _describe(item))
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(annotation))
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    raise TypeError(f"config fields of type {annotation!r} are not supported")


def _typed(value: Any, annotation: Any, key: str) -> Any:
    """`value` checked against a field's declared type (ints accepted, and converted, where a float is
    declared: YAML reads `1` as an int); a mismatch is a ConfigError naming the key."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if get_origin(annotation) is Literal:
        choices = list(get_args(annotation))
        # `True == 1`: compare types too, so `true` is not taken for a choice `1` (or the reverse).
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if get_origin(annotation) in (Union, UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _typed(value, option, key)
            except ConfigError:
                continue
        raise _mismatch(key, annotation, value, text_allowed=str in options)
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")
        return [_typed(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    # bool is a subclass of int in Python; `epochs: true` is a mistake, not 1 epoch.
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, str):
        return value
    raise _mismatch(key, annotation, value, text_allowed=annotation is str)


def _mismatch(key: str, annotation: Any, value: Any, *, text_allowed: bool) -> ConfigError:
    hint = ""
    if text_allowed and isinstance(value, (bool, int, float)):
        # YAML reads `2018`, `1e3` or `yes` as a number or a boolean; quoting keeps the text.
        hint = f" (quote it to keep it as text: '{value}')"
    return ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}{hint}")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested dicts, rejecting unknown keys."""
    config: Config = _build(Config, values or {}, "")
    return config


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
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_one_line(exc)})") from exc
    return values


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path, or a bundled config's name like `shapes-lt-tiny`) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            values = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {str(resolved)!r} is not valid YAML: {_one_line(exc)}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {str(resolved)!r} cannot be read: {exc}") from exc
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
