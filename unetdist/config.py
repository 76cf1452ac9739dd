"""Typed configuration: YAML file -> dataclasses, with dotted `section.key=value` overrides.

Every knob a run depends on lives here so that the resolved config saved in the run folder
is enough to reproduce the run. Unknown keys and wrong types are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class UserError(Exception):
    """A mistake the user must fix (config, command-line arguments, input files), not a bug in unetdist.

    The command line prints its message as one line and exits with status 2; any other exception is a
    bug and keeps its traceback. Raise a subclass wherever the code reports a user mistake, and say in
    the message which file, key or value is wrong and what to do.
    """


class ConfigError(UserError, ValueError):
    """A config file, key or value a user must fix; the message says which and how."""


class UsageError(UserError, ValueError):
    """Command-line arguments that do not fit together (e.g. two options that exclude each other)."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    resume: str = "auto"  # auto | force (also when data or schedule changed) | never | path to a checkpoint
    stop_at: int = 0  # checkpoint and exit once this global step is reached (0: run to train.steps)


@dataclass
class ModelConfig:
    in_channels: int | None = None  # None: the dataset's (manifest.json); stated values are checked against it
    num_classes: int | None = None  # None: the dataset's; both 1 and 2 where no dataset tells (benchmarks)
    base_width: int = 64
    depth: int = 4
    bilinear: bool = False
    norm: Literal["batch", "group", "instance"] = "batch"

    def hparams(self) -> dict[str, Any]:
        """`UNet(**hparams)` arguments; channels and classes not (yet) taken from a dataset are 1 and 2."""
        out = dataclasses.asdict(self)
        out["in_channels"] = 1 if self.in_channels is None else self.in_channels
        out["num_classes"] = 2 if self.num_classes is None else self.num_classes
        return out


@dataclass
class SynthConfig:
    """The synthetic fluorescence images made when `data.root` holds no dataset yet."""

    images: int = 16
    height: int = 256
    width: int = 256
    seed: int = 0
    boundary: bool = False


@dataclass
class ShardConfig:
    """How `unetdist shard` (and data.generate / data.fetch) cut images into WebDataset shards."""

    tile: int = 128
    overlap: int = 0
    shard_bytes: int = 256 * 1024 * 1024
    min_shards: int = 1  # per split, when there are enough tiles: at least ranks x workers at scale
    val_fraction: float = 0.25
    seed: int = 0
    axes: str = "auto"  # storage order over T, C, Z, Y, X, e.g. "TZCYX"; auto: from OME/ImageJ/NGFF metadata
    labels: Literal["classes", "instances"] = "classes"  # class masks, or instance ids converted to classes
    frame_block: int = 0  # time-lapse: consecutive frames per train/val split unit (0: the whole stack)
    min_foreground: float = 0.0  # train tiles with less foreground than this are "empty"
    empty_keep: float = 1.0  # fraction of empty train tiles kept (0: reject all; 1: keep all)
    weight_map: bool = False  # store the U-Net paper's per-pixel weight map with every tile
    w0: float = 10.0  # weight map: border term amplitude
    sigma: float = 5.0  # weight map: border term width in pixels
    class_balance: bool = True  # weight map: w_c(x) = 1 / (K x frequency of the class of x); false: 1
    workers: int = 0  # processes reading and tiling images (0: one per CPU core for inputs over 64 MB, else 1)
    region_pixels: int = 16_777_216  # images are read and tiled in bands of about this many pixels (bounds memory)
    skip_background: str = "off"  # off, bright or dark: drop train tiles a low-res view shows as background


@dataclass
class AugmentConfig:
    """On-the-fly training augmentation in the loader workers; each part off with p = 0 (or false)."""

    enabled: bool = True  # master switch (`data.augment: false` turns everything off)
    crop: int = 0  # random crops of this size from the stored tiles (0: whole tiles)
    foreground_oversample: float = 0.0  # chance a crop is centred on a foreground pixel (nnU-Net: 0.33)
    flip: bool = True  # the 8 flips / 90-degree rotations
    rotate_p: float = 0.0
    rotate_deg: float = 15.0  # small rotations: angle uniform in +-rotate_deg
    scale_p: float = 0.0
    scale: float = 0.15  # zoom factor uniform in [1 - scale, 1 + scale]
    elastic_p: float = 0.0
    elastic_grid: int = 3  # the U-Net paper: 3 x 3 grid of random displacements ...
    elastic_sigma: float = 10.0  # ... with this standard deviation in pixels, bicubically interpolated
    intensity_p: float = 0.0  # chance of each of brightness, contrast, gamma
    brightness: float = 0.1  # additive shift, uniform in +-brightness (normalised units)
    contrast: float = 0.25  # factor uniform in [1 - contrast, 1 + contrast] around the tile mean
    gamma: float = 0.3  # exponent exp(uniform(+-gamma)) on the tile's [min, max] range
    noise_p: float = 0.0
    noise_std: float = 0.1  # Gaussian noise, std uniform in [0, noise_std] (normalised units)
    blur_p: float = 0.0
    blur_sigma: float = 1.0  # Gaussian blur, sigma uniform in [0.5, blur_sigma] pixels
    device: Literal["cpu", "cuda"] = "cpu"  # crop/rotate/scale/elastic in the loader, or on the training device


@dataclass
class NormalizeConfig:
    """How raw pixels become network input (the same transform is stored with the model for prediction)."""

    mode: Literal["percentile", "dataset"] = "percentile"  # per-image percentiles, or the training set's statistics
    low: float = 1.0  # percentile mode: per image and channel, (x - p_low) / (p_high - p_low) ...
    high: float = 99.8  # ... with these percentiles of the whole image (StarDist's; cellpose uses 1 and 99)


@dataclass
class CacheConfig:
    """The node-local cache of shards read from a URL data.root (see unetdist/data/cache.py)."""

    dir: str = ""  # a local folder shared by the ranks of a node ("": no cache, stream every epoch)
    max_bytes: int = 0  # least recently used shards are deleted above this size (0: no limit)
    prefetch: int = 2  # shards downloaded ahead of the one being read


@dataclass
class DataConfig:
    """The data section. `generate_asked` (not a key) is set by `load_config`: data.generate was on the command line."""

    generate_asked: ClassVar[bool] = False  # instance attribute when set; a class default otherwise
    root: str = "data/synth-default"  # folder or http(s)/s3/gs URL holding manifest.json and the shards
    train_urls: str = ""  # optional WebDataset URL(s) overriding the manifest's train shards
    val_urls: str = ""
    batch_size: int = 8  # per device
    global_batch: int = 0  # > 0: data.batch_size = this / world size, so a job requeued on other nodes keeps its data order
    workers: int = 2
    shuffle_buffer: int = 256  # raw samples a reader of all partitions holds for shuffling
    partitions: int = 0  # fixed partitions of the sample order (0: largest divisor of the global batch <= shards)
    retries: int = 5  # attempts after a failed or broken connection to a shard server
    retry_wait: float = 0.5  # seconds before the first retry, doubled each time (at most 30 s)
    cache: CacheConfig = field(default_factory=CacheConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # `true`/`false` still accepted
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    generate: bool = False  # make the synthetic dataset in `root` when it is missing
    fetch: str = ""  # or download this dataset (e.g. cellunet-nuclei) and shard it into `root` when missing
    cache_dir: str = ""  # downloads are kept here ("": ~/.cache/unetdist)
    synth: SynthConfig = field(default_factory=SynthConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)


@dataclass
class TrainConfig:
    steps: int = 1000
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.99  # SGD only; the U-Net paper's value
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # 0 disables
    grad_accum: int = 1  # micro-steps per optimizer step; data.batch_size is split into this many micro-batches
    dice_weight: float = 1.0
    weight_map: bool = False  # weight cross-entropy by the shards' per-pixel U-Net weight maps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = True  # NHWC; measured faster on both CPUs tried (width <= 16) and on tensor-core GPUs
    compile: bool | Literal["default", "max-autotune"] = False  # torch.compile mode (true: "default")
    activation_checkpointing: Literal["none", "all", "highres"] = "none"
    val_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    stop_check_every: int = 10  # steps between the ranks' agreement on a stop signal (a host-device sync)
    image_grid: int = 4  # samples in the TensorBoard picture at each validation


@dataclass
class DeepSpeedConfig:
    """Our keys for the DeepSpeed backend; the DeepSpeed JSON config is generated from them."""

    zero_stage: int = 0
    reduce_bucket_size: int = 50_000_000  # elements
    allgather_bucket_size: int = 50_000_000  # elements
    overlap_comm: bool = False
    optimizer: Literal["torch", "deepspeed"] = "torch"  # ours passed in, or DeepSpeed's (JIT-built fused kernels)
    scheduler: Literal["torch", "deepspeed"] = "torch"  # ours (warmup + cosine) or DeepSpeed's WarmupCosineLR
    extra: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys merged in; conflicts are errors


@dataclass
class ParallelConfig:
    backend: Literal["ddp", "deepspeed"] = "ddp"
    sync_batchnorm: bool = True  # GPU only: gloo has no SyncBatchNorm
    bucket_mb: int = 25
    static_graph: bool = False
    gradient_as_bucket_view: bool = True  # DDP: gradients are views of the all-reduce buckets (no copy)
    grad_compression: Literal["none", "bf16"] = "none"  # DDP: all-reduce gradients in bf16 (half the bytes)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read `path` (or start from defaults), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (give a YAML file, e.g. configs/default.yaml)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, where=str(path) if path else "config")
    validate(cfg)
    # data.generate from a file applies to the shipped roots only; on the command line, to any root
    cfg.data.generate_asked = any(item.split("=", 1)[0].strip() == "data.generate" for item in overrides)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config saved by `to_dict` (e.g. inside a checkpoint)."""
    cfg = _build(Config, raw, where="saved config")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    checks = [
        (cfg.model.in_channels is None or cfg.model.in_channels >= 1, "model.in_channels must be >= 1"),
        (cfg.model.num_classes is None or cfg.model.num_classes >= 2,
         "model.num_classes must be >= 2 (background + at least one class)"),
        (cfg.model.base_width >= 1, "model.base_width must be >= 1"),
        (cfg.model.depth >= 1, "model.depth must be >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0"),
        *_data_checks(cfg.data),
        (cfg.run.stop_at >= 0, "run.stop_at must be >= 0 (0: run to train.steps)"),
        (cfg.train.steps >= 1, "train.steps must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (0.0 <= cfg.train.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (cfg.train.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
        (cfg.train.val_every >= 0, "train.val_every must be >= 0 (0: only at the end)"),
        (cfg.train.ckpt_every >= 0, "train.ckpt_every must be >= 0 (0: only at the end)"),
        (cfg.train.keep_last >= 1, "train.keep_last must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.stop_check_every >= 1, "train.stop_check_every must be >= 1"),
        (cfg.parallel.bucket_mb >= 1, "parallel.bucket_mb must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.data.batch_size % cfg.train.grad_accum == 0,
         f"data.batch_size={cfg.data.batch_size} (per device per optimizer step) must be divisible by "
         f"train.grad_accum={cfg.train.grad_accum} (the micro-batch is their quotient)"),
        (cfg.parallel.deepspeed.zero_stage in (0, 1, 2, 3), "parallel.deepspeed.zero_stage must be 0, 1, 2 or 3"),
    ]
    for ok, message in checks + _shape_checks(cfg):
        if not ok:
            raise ConfigError(message)


def _shape_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Settings the U-Net cannot train with, refused before any data is read (not deep inside a layer)."""
    model, aug = cfg.model, cfg.data.augment
    key, size = ("data.augment.crop", aug.crop) if aug.enabled and aug.crop else ("data.shard.tile", cfg.data.shard.tile)
    need = 2**model.depth
    bottleneck = (size // need) ** 2  # pixels per map at the lowest resolution
    micro = cfg.data.batch_size // max(1, cfg.train.grad_accum)
    return [
        (size >= need, f"{key}={size} is too small for model.depth={model.depth}: the U-Net halves its input "
                       f"{model.depth} times and needs at least {need} px; raise {key} or lower model.depth"),
        (size < need or model.norm != "instance" or bottleneck >= 2,
         f"model.norm=instance with {key}={size} and model.depth={model.depth} leaves a 1x1 bottleneck, which "
         f"instance norm cannot normalise; use {key} >= {2 * need}, a lower model.depth, or model.norm=group"),
        (size < need or model.norm != "batch" or micro * bottleneck >= 2,
         f"a micro-batch of 1 (data.batch_size={cfg.data.batch_size} / train.grad_accum={cfg.train.grad_accum}) "
         f"with model.norm=batch and a 1x1 bottleneck ({key}={size}, model.depth={model.depth}) gives BatchNorm one "
         f"value per channel; use a micro-batch >= 2, {key} >= {2 * need}, or model.norm=group"),
    ]


def _data_checks(data: DataConfig) -> list[tuple[bool, str]]:
    shard, aug = data.shard, data.augment
    probabilities = ("foreground_oversample", "rotate_p", "scale_p", "elastic_p", "intensity_p", "noise_p", "blur_p")
    return [
        (not (data.generate and data.fetch), "data.generate and data.fetch exclude each other; set one"),
        (0.0 <= data.normalize.low < data.normalize.high <= 100.0,
         f"data.normalize.low={data.normalize.low} and data.normalize.high={data.normalize.high} must satisfy "
         "0 <= low < high <= 100 (percentiles)"),
        *((False, problem) for problem in shard_problems(shard)),
        *((False, problem) for problem in shard_problems(shard)),
        (aug.crop == 0 or aug.crop >= 8, "data.augment.crop must be 0 (whole tiles) or >= 8"),
        *((0.0 <= getattr(aug, p) <= 1.0, f"data.augment.{p} must be a probability in [0, 1]") for p in probabilities),
        (0.0 <= aug.scale < 1.0, "data.augment.scale must be in [0, 1)"),
        (aug.elastic_grid >= 2, "data.augment.elastic_grid must be >= 2"),
        (aug.blur_sigma >= 0.5, "data.augment.blur_sigma must be >= 0.5"),
        (data.partitions >= 0, "data.partitions must be >= 0 (0: automatic)"),
        (data.global_batch >= 0, "data.global_batch must be >= 0 (0: data.batch_size is per device)"),
        (data.retries >= 0 and data.retry_wait >= 0, "data.retries and data.retry_wait must be >= 0"),
        (data.cache.max_bytes >= 0 and data.cache.prefetch >= 0, "data.cache.max_bytes and data.cache.prefetch "
         "must be >= 0 (max_bytes 0: no limit)"),
        (not (data.cache.dir and "://" in data.cache.dir), f"data.cache.dir={data.cache.dir!r} must be a local folder"),
    ]


def shard_problems(shard: ShardConfig, name: typing.Callable[[str], str] = lambda key: f"data.shard.{key}") -> list[str]:
    """What is wrong with shard settings; `name` spells a key as the user wrote it (config key or flag)."""
    checks = [
        (shard.tile >= 8, f"{name('tile')}={shard.tile} must be >= 8"),
        (0 <= shard.overlap < shard.tile, f"{name('overlap')}={shard.overlap} must be in [0, tile={shard.tile})"),
        (shard.shard_bytes >= 1, f"{name('shard_bytes')}={shard.shard_bytes} must be >= 1"),
        (0.0 < shard.val_fraction < 1.0, f"{name('val_fraction')}={shard.val_fraction} must be in (0, 1)"),
        (shard.min_shards >= 1, f"{name('min_shards')}={shard.min_shards} must be >= 1"),
        (shard.frame_block >= 0, f"{name('frame_block')}={shard.frame_block} must be >= 0 "
                                 "(0: a whole stack is one split unit)"),
        (0.0 <= shard.min_foreground <= 1.0, f"{name('min_foreground')}={shard.min_foreground} must be in [0, 1]"),
        (0.0 <= shard.empty_keep <= 1.0, f"{name('empty_keep')}={shard.empty_keep} must be in [0, 1]"),
        (shard.w0 >= 0, f"{name('w0')}={shard.w0} must be >= 0"),
        (shard.sigma > 0, f"{name('sigma')}={shard.sigma} must be > 0"),
        (shard.workers >= 0, f"{name('workers')}={shard.workers} must be >= 0 (0: automatic)"),
        (shard.region_pixels >= 65536, f"{name('region_pixels')}={shard.region_pixels} must be >= 65536 "
                                       "(pixels read at once per band)"),
        (shard.skip_background in ("off", "bright", "dark"), f"{name('skip_background')}={shard.skip_background!r} "
                                                              "must be off, bright (fluorescence) or dark (brightfield)"),
    ]
    return [message for ok, message in checks if not ok]


def check_shard(shard: ShardConfig, name: typing.Callable[[str], str] = lambda key: f"data.shard.{key}") -> None:
    """ConfigError naming the first bad shard setting (the same checks for the config and `unetdist shard`)."""
    problems = shard_problems(shard, name)
    if problems:
        raise ConfigError(problems[0])


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if isinstance(child, bool):  # `augment: true` in the file, then `augment.crop=96` on the command line
            child = node[key] = {"enabled": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(text) if text.strip() else ""


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for section {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {where_key(where, near[0])!r}?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {where_key(where, key)!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, where_key(where, key))
    return cls(**kwargs)


def where_key(where: str, key: str) -> str:
    prefix = "" if where in ("config", "saved config") or where.endswith((".yaml", ".yml")) else where + "."
    return f"{prefix}{key}"


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if isinstance(value, bool) and "enabled" in {f.name for f in dataclasses.fields(hint)}:
            value = {"enabled": value}  # `section: true/false` is shorthand for `section.enabled`
        return _build(hint, value if value is not None else {}, key)
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key {key!r} has the wrong type: {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"config key {key!r} must be {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})"
    )
