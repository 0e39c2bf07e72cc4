"""Typed, frozen configuration loaded from ``params.yaml``.

Every section of ``params.yaml`` is a frozen dataclass below. Loading is strict: an unknown key, a
missing key, a value of the wrong type or an impossible value raises :class:`ConfigError` naming the
dotted key (``train.lr``) and the file. ``load_params()`` is the one way code reads configuration.

One module by design (~600 lines): it is the schema of params.yaml, a section per dataclass in the file's
order, so a reader checks a key and its rules in one place; the sections change together with the file.

    python -c "from pipeline.config import load_params; print(load_params())"
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pipeline.data.layout import SETS_BY_NAME
from pipeline.modeling.specs import METHODS


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class DataConfig:
    source: Literal["embedded", "hqseg44k"]
    root: str
    train_sets: tuple[str, ...]
    eval_sets: tuple[str, ...]
    max_images_per_set: int

    def validate(self) -> None:
        for key in ("train_sets", "eval_sets"):
            for name in getattr(self, key):
                if name not in SETS_BY_NAME:
                    raise ConfigError(f"data.{key}: unknown set {name!r}; known: {', '.join(SETS_BY_NAME)}")
        _non_negative("data.max_images_per_set", self.max_images_per_set)


@dataclass(frozen=True)
class DownloadConfig:
    endpoint: str
    archives: tuple[str, ...]
    cache_dir: str
    expected_sha256: dict[str, str]
    timeout_s: float
    retries: int

    def validate(self) -> None:
        if not self.endpoint.startswith(("http://", "https://", "file://")):
            raise ConfigError(f"download.endpoint must be an http(s):// or file:// URL, got {self.endpoint!r}")
        for name, digest in self.expected_sha256.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ConfigError(f"download.expected_sha256.{name}: not a 64-hex-digit sha256: {digest!r}")
        _positive("download.timeout_s", self.timeout_s)
        _non_negative("download.retries", self.retries)


@dataclass(frozen=True)
class GenerateConfig:
    seed: int
    train_images_per_set: int
    eval_images_per_set: int
    min_side: int
    max_side: int
    max_distractors: int
    inject_defects: bool

    def validate(self) -> None:
        _positive("generate.train_images_per_set", self.train_images_per_set)
        _positive("generate.eval_images_per_set", self.eval_images_per_set)
        if not 64 <= self.min_side <= self.max_side:
            raise ConfigError("generate.min_side/max_side: need 64 <= min_side <= max_side")
        _non_negative("generate.max_distractors", self.max_distractors)


@dataclass(frozen=True)
class IndexConfig:
    mask_threshold: int
    min_mask_pixels: int

    def validate(self) -> None:
        if not 0 <= self.mask_threshold < 255:
            raise ConfigError("index.mask_threshold must be in [0, 255)")
        _positive("index.min_mask_pixels", self.min_mask_pixels)


@dataclass(frozen=True)
class SamConfig:
    variant: Literal["tiny", "vit_b", "vit_l", "vit_h"]
    checkpoint_url: str
    checkpoint_sha256: str
    cache_dir: str

    def validate(self) -> None:
        if self.checkpoint_sha256 and len(self.checkpoint_sha256) != 64:
            raise ConfigError("sam.checkpoint_sha256 must be empty or a 64-hex-digit sha256")


@dataclass(frozen=True)
class BasePretrainConfig:
    seed: int
    img_size: int
    grid: int
    steps: int
    batch_size: int
    lr: float
    images: int
    thin_fraction: float
    mask_prompt_p: float
    parts_steps: int  # second phase (0 = none): from the first phase's weights, with part targets
    parts_lr: float
    parts_images: int
    part_p: float  # share of the second phase's targets that are a part of the object
    group_p: float  # share of the second phase's targets that are the object with the objects touching it

    def validate(self) -> None:
        _positive("base_pretrain.grid", self.grid)
        _probability("base_pretrain.thin_fraction", self.thin_fraction)
        _probability("base_pretrain.mask_prompt_p", self.mask_prompt_p)
        _probability("base_pretrain.part_p", self.part_p)
        _probability("base_pretrain.group_p", self.group_p)
        if self.part_p + self.group_p > 1:
            raise ConfigError("base_pretrain.part_p + base_pretrain.group_p must be <= 1 (the rest are whole objects)")
        if self.img_size % self.grid:
            raise ConfigError("base_pretrain.img_size must be a multiple of base_pretrain.grid")
        for key in ("steps", "batch_size", "images"):
            _positive(f"base_pretrain.{key}", getattr(self, key))
        _positive("base_pretrain.lr", self.lr)
        if self.parts_steps < 0:
            raise ConfigError("base_pretrain.parts_steps must be >= 0 (0 = no part phase)")
        if self.parts_steps:
            _positive("base_pretrain.parts_lr", self.parts_lr)
            _positive("base_pretrain.parts_images", self.parts_images)


@dataclass(frozen=True)
class ViewsConfig:
    jitter_views: int
    scale_min: float
    scale_max: float
    hflip_p: float
    occlusion_p: float
    min_visible_frac: float
    seed: int
    output_size: int
    pad_fill: int
    occluder_scale_min: float
    occluder_scale_max: float
    min_mask_pixels: int
    max_tries: int

    def validate(self) -> None:
        _non_negative("views.jitter_views", self.jitter_views)
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError("views.scale_min/scale_max: need 0 < scale_min <= scale_max")
        for key in ("hflip_p", "occlusion_p", "min_visible_frac"):
            _probability(f"views.{key}", getattr(self, key))
        _non_negative("views.output_size", self.output_size)
        if not 0 <= self.pad_fill <= 255:
            raise ConfigError("views.pad_fill must be a pixel value in [0, 255]")
        if not 0 < self.occluder_scale_min <= self.occluder_scale_max:
            raise ConfigError("views.occluder_scale_min/occluder_scale_max: need 0 < min <= max")
        _positive("views.min_mask_pixels", self.min_mask_pixels)
        _positive("views.max_tries", self.max_tries)


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int
    bf16: bool
    device: Literal["auto", "cpu", "cuda"]
    row_group_size: int
    shard_rows: int
    render_workers: int

    def validate(self) -> None:
        _positive("embed.batch_size", self.batch_size)
        _positive("embed.row_group_size", self.row_group_size)
        _positive("embed.shard_rows", self.shard_rows)
        if self.render_workers < -1:
            raise ConfigError("embed.render_workers must be -1 (auto), 0 (inline) or a number of threads")


TRAIN_PROMPT_TYPES = ("gt_box", "noisy_box", "points", "coarse_mask")
EVAL_PROMPT_TYPES = ("gt_box", "noisy_box", "point_1", "point_3", "point_5", "point_10", "point_20", "oracle_point")


@dataclass(frozen=True)
class PromptsConfig:
    seed: int
    train_type_probs: dict[str, float]
    train_point_counts: tuple[int, ...]
    box_noise_scale: float
    noisy_box_min_iou: float
    coarse_mask_band: float
    eval_types: tuple[str, ...]
    eval_draws: int
    train_prompts_per_view: int
    coarse_mask_logits: tuple[float, ...]

    def validate(self) -> None:
        _positive("prompts.train_prompts_per_view", self.train_prompts_per_view)
        if len(self.coarse_mask_logits) != 2:
            raise ConfigError("prompts.coarse_mask_logits must be [background, foreground]")
        for name, p in self.train_type_probs.items():
            if name not in TRAIN_PROMPT_TYPES:
                raise ConfigError(f"prompts.train_type_probs: unknown type {name!r}; known: {TRAIN_PROMPT_TYPES}")
            _non_negative(f"prompts.train_type_probs.{name}", p)
        if sum(self.train_type_probs.values()) <= 0:
            raise ConfigError("prompts.train_type_probs must not all be zero")
        for n in self.train_point_counts:
            _positive("prompts.train_point_counts[]", n)
        for name in self.eval_types:
            if name not in EVAL_PROMPT_TYPES:
                raise ConfigError(f"prompts.eval_types: unknown type {name!r}; known: {EVAL_PROMPT_TYPES}")
        _non_negative("prompts.box_noise_scale", self.box_noise_scale)
        _probability("prompts.noisy_box_min_iou", self.noisy_box_min_iou)
        _positive("prompts.eval_draws", self.eval_draws)


@dataclass(frozen=True)
class PluginConfig:
    dsp_offset_range: float
    dsp_resample_pe: bool
    drp_hidden: int
    drp_token_index: int
    drp_norm: Literal["softmax", "sigmoid"]
    drp_init_alpha1: float
    dsp_zero_mean: bool = False  # plugin files written before this key existed were trained without it

    def validate(self) -> None:
        _positive("plugin.dsp_offset_range", self.dsp_offset_range)
        _positive("plugin.drp_hidden", self.drp_hidden)
        if not 0.0 < self.drp_init_alpha1 < 1.0:
            raise ConfigError(f"plugin.drp_init_alpha1 must be in (0, 1), got {self.drp_init_alpha1!r}")
        if self.drp_token_index not in (0, 1, 2, 3, 4):
            raise ConfigError("plugin.drp_token_index must index SAM's 5 output tokens (0 = IoU token)")


@dataclass(frozen=True)
class TrainConfig:
    methods: tuple[str, ...]
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    batch_size: int
    epochs: float
    max_steps: int
    multimask_output: bool
    loss_points: int
    oversample_ratio: float
    importance_sample_ratio: float
    checkpoint_every: int
    device: Literal["auto", "cpu", "cuda"]
    bf16: bool
    num_workers: int
    shuffle_buffer: int
    ddp_partition: Literal["rows", "row_groups"]
    lr_schedule: Literal["constant", "cosine"]
    warmup_steps: int
    sanity_views: int
    drp_lr_scale: float

    def validate(self) -> None:
        _positive("train.lr", self.lr)
        _non_negative("train.warmup_steps", self.warmup_steps)
        _non_negative("train.sanity_views", self.sanity_views)
        _positive("train.drp_lr_scale", self.drp_lr_scale)
        _non_negative("train.weight_decay", self.weight_decay)
        _probability("train.beta1", self.beta1)
        _probability("train.beta2", self.beta2)
        _positive("train.batch_size", self.batch_size)
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("train.epochs or train.max_steps must be positive")
        _positive("train.loss_points", self.loss_points)
        if self.oversample_ratio < 1:
            raise ConfigError("train.oversample_ratio must be >= 1")
        _probability("train.importance_sample_ratio", self.importance_sample_ratio)
        _positive("train.checkpoint_every", self.checkpoint_every)
        _non_negative("train.num_workers", self.num_workers)
        _positive("train.shuffle_buffer", self.shuffle_buffer)


@dataclass(frozen=True)
class SeedsConfig:
    extra: tuple[int, ...]
    methods: tuple[str, ...]

    def validate(self) -> None:
        if len(set(self.extra)) != len(self.extra):
            raise ConfigError(f"seeds.extra: repeated seeds {list(self.extra)}")


COCO_ENTRY_KEYS = ("name", "images", "annotations", "box_source", "detections")
FOLDER_ENTRY_KEYS = ("name", "images", "masks", "mask_suffix")


def _validate_eval_entries(coco: tuple[dict[str, Any], ...], folders: tuple[dict[str, Any], ...]) -> None:
    """evaluate.coco / evaluate.folders entries: exact keys, string values, unique names, valid box source."""
    names: set[str] = set(SETS_BY_NAME)
    for section, keys, entries in (("coco", COCO_ENTRY_KEYS, coco), ("folders", FOLDER_ENTRY_KEYS, folders)):
        for i, entry in enumerate(entries):
            where = f"evaluate.{section}[{i}]"
            if not isinstance(entry, Mapping) or set(entry) != set(keys):
                got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
                raise ConfigError(f"{where}: needs exactly the keys {', '.join(keys)}; got {got}")
            if any(not isinstance(entry[k], str) for k in keys):
                raise ConfigError(f"{where}: every value must be a string")
            for k in ("images", "masks", "annotations"):
                if k in entry and not entry[k]:
                    raise ConfigError(f"{where}.{k}: must not be empty (a path: the stage depends on it)")
            if not entry["name"] or "/" in entry["name"] or entry["name"] in names:
                raise ConfigError(f"{where}.name: {entry['name']!r} is empty, contains '/' or is already used")
            names.add(entry["name"])
            if section == "coco":
                if entry["box_source"] not in ("gt", "noisy", "detections"):
                    raise ConfigError(f"{where}.box_source: {entry['box_source']!r} is not one of gt, noisy, detections")
                if (entry["box_source"] == "detections") != bool(entry["detections"]):
                    raise ConfigError(f"{where}.detections: give a detections json exactly when box_source is 'detections'")
            elif not entry["mask_suffix"]:
                raise ConfigError(f"{where}.mask_suffix: must not be empty (e.g. '.png')")


@dataclass(frozen=True)
class EvaluateConfig:
    methods: tuple[str, ...]
    benchmarks: tuple[str, ...]
    postprocess: Literal["sam", "squash"]
    boundary_dilation_ratio: float
    gallery_images: int
    device: Literal["auto", "cpu", "cuda"]
    bf16: Literal["auto", True, False]
    batch_size: int
    flush_every: int
    coco: tuple[dict[str, Any], ...]
    folders: tuple[dict[str, Any], ...]

    def validate(self) -> None:
        _positive("evaluate.boundary_dilation_ratio", self.boundary_dilation_ratio)
        _non_negative("evaluate.gallery_images", self.gallery_images)
        _positive("evaluate.batch_size", self.batch_size)
        _positive("evaluate.flush_every", self.flush_every)
        _validate_eval_entries(self.coco, self.folders)
        hq = [s for s in SETS_BY_NAME if SETS_BY_NAME[s].split == "eval"]
        user = {**{e["name"]: "coco" for e in self.coco}, **{e["name"]: "folders" for e in self.folders}}
        seen: set[str] = set()
        for name in self.benchmarks:
            if name in user:
                raise ConfigError(
                    f"evaluate.benchmarks: {name!r} is an evaluate.{user[name]} entry; every entry of "
                    "evaluate.coco / evaluate.folders is scored by its own stage, so list only HQ eval sets "
                    f"here ({', '.join(hq)})")
            if name not in hq:
                raise ConfigError(
                    f"evaluate.benchmarks: unknown benchmark {name!r}; valid names: {', '.join(hq)} (HQ eval sets)"
                    + (f"; your datasets {', '.join(user)} are scored without being listed here" if user else "")
                    + "; add your own data to evaluate.coco / evaluate.folders")
            if name in seen:
                raise ConfigError(f"evaluate.benchmarks: {name!r} is listed twice")
            seen.add(name)

    def all_benchmarks(self) -> tuple[str, ...]:
        """Every scored benchmark: ``benchmarks`` (HQ sets), then the evaluate.coco and evaluate.folders names."""
        return (*self.benchmarks, *(str(e["name"]) for e in self.coco), *(str(e["name"]) for e in self.folders))


@dataclass(frozen=True)
class ReportConfig:
    baseline: str
    ours: str
    headline_prompts: tuple[str, ...]
    gallery_prompts: tuple[str, ...]
    gallery_draw: int
    gallery_max_side: int

    def validate(self) -> None:
        for key in ("headline_prompts", "gallery_prompts"):
            for name in getattr(self, key):
                if name not in EVAL_PROMPT_TYPES:
                    raise ConfigError(f"report.{key}: unknown prompt type {name!r}; known: {EVAL_PROMPT_TYPES}")
        if self.baseline == self.ours:
            raise ConfigError("report.baseline and report.ours must be two different methods")
        _non_negative("report.gallery_draw", self.gallery_draw)
        if self.gallery_max_side < 64:
            raise ConfigError(f"report.gallery_max_side must be >= 64 px, got {self.gallery_max_side}")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str
    experiment: str
    registered_model: str
    promote_metric: str
    promote_margin: float
    headline_metrics: tuple[str, ...]

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment must not be empty")
        if not self.registered_model:
            raise ConfigError("tracking.registered_model must not be empty")
        for key, path in [("promote_metric", self.promote_metric)] + [("headline_metrics[]", m) for m in self.headline_metrics]:
            if len(path.split(".")) < 3 or "" in path.split("."):
                raise ConfigError(f"tracking.{key}: {path!r} must be a dotted path "
                                  "<benchmark>.<method>.<prompt_type>[.<metric>] into metrics/eval.json")
        _non_negative("tracking.promote_margin", self.promote_margin)


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str
    timezone: str
    network_retries: int
    retry_delay_s: float

    def validate(self) -> None:
        if len(self.cron.split()) != 5:
            raise ConfigError(f"schedule.cron must have 5 fields (min hour dom month dow), got {self.cron!r}")
        _non_negative("schedule.network_retries", self.network_retries)
        _non_negative("schedule.retry_delay_s", self.retry_delay_s)


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``."""

    seed: int
    data: DataConfig
    download: DownloadConfig
    generate: GenerateConfig
    index: IndexConfig
    sam: SamConfig
    base_pretrain: BasePretrainConfig
    views: ViewsConfig
    embed: EmbedConfig
    prompts: PromptsConfig
    plugin: PluginConfig
    train: TrainConfig
    seeds: SeedsConfig
    evaluate: EvaluateConfig
    report: ReportConfig
    tracking: TrackingConfig
    schedule: ScheduleConfig

    def validate(self) -> None:
        """Every method named in train/evaluate exists (a missing plugin file is caught by the evaluate stage)."""
        for key, names in (("train.methods", self.train.methods), ("evaluate.methods", self.evaluate.methods)):
            for name in names:
                if name not in METHODS:
                    raise ConfigError(f"{key}: unknown method {name!r}; known: {', '.join(METHODS)}")
        missing = [m for m in self.evaluate.methods if m not in self.train.methods]
        if missing:  # each evaluate stage depends on its own method's plugin file, which train@<method> writes
            raise ConfigError(f"evaluate.methods: {', '.join(map(repr, missing))} not in train.methods "
                              f"{list(self.train.methods)}; add them (`sam` trains nothing: an empty plugin file)")
        for name in self.seeds.methods:
            if name not in self.train.methods or name not in self.evaluate.methods:
                raise ConfigError(f"seeds.methods: {name!r} must also be in train.methods and evaluate.methods "
                                  "(its first seed is the pipeline's own run)")
        for key in ("baseline", "ours"):
            name = getattr(self.report, key)
            if name not in self.evaluate.methods:
                raise ConfigError(f"report.{key}: {name!r} is not in evaluate.methods {list(self.evaluate.methods)}")
        if self.seed in self.seeds.extra:
            raise ConfigError(f"seeds.extra: {self.seed} is the pipeline's own `seed`; list only the other seeds")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), e.g. for logging or a checkpoint's config."""
        return _plain(dataclasses.asdict(self))


def load_params(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Params:
    """Read, type-check and validate a params file.

    ``overrides`` maps dotted keys to values (``{"train.lr": 3e-4}``), like ``dvc exp run -S``.
    Raises :class:`ConfigError` with the dotted key and the file name on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, path)
    try:
        return _build(Params, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Build :class:`Params` from an already-parsed mapping (tests, stored run configs)."""
    return _build(Params, dict(raw), "")


def replace(params: Params, **dotted: Any) -> Params:
    """A copy of ``params`` with dotted keys changed: ``replace(p, **{"train.lr": 1e-4})``."""
    raw = params.to_dict()
    for key, value in dotted.items():
        _set_dotted(raw, key, value, Path("<replace>"))
    return params_from_dict(raw)


# --------------------------------------------------------------------------------------------------
def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, path: Path) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{path}: override {dotted!r}: {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'top level'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix[:-1]}" if prefix else "top level"
        raise ConfigError(f"unknown key {prefix + unknown[0]!r} in {where}; allowed keys: {', '.join(names)}")
    values = {}
    for name in names:
        key = f"{prefix}{name}"
        if name not in raw:
            raise ConfigError(f"missing key {key!r}")
        values[name] = _coerce(hints[name], raw[name], key)
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):  # 1 is not True, "true" is not True
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in params")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")


def _probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} must be in [0, 1], got {value!r}")


__all__ = ["ConfigError", "Params", "load_params", "params_from_dict", "replace", "field"]
