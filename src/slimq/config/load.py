"""Read a simple config file into typed, validated settings (model-independent checks only).

Errors name the file, the line and the field, and say what to write instead.
"""
from __future__ import annotations

import bisect

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, TypeVar, Union

from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from .._io import read_text_file
from .._proto import load_proto
from ..errors import ConfigError
from .plan import ActQuantSpec, ChannelPruneSpec, Sparse24Spec, WeightQuantSpec

__all__ = ["ConfigMessages", "LayerOverride", "ParsedConfig", "load_config", "parse_config_text",
           "require_features"]

log = logging.getLogger("slimq")

ConfigMessages = load_proto("slimq.config", "retrain_config.proto")
_DTYPE_NAMES = {0: 4, 1: 8, 2: 16}  # DataType enum number -> bits
PruneSpec = Union[ChannelPruneSpec, Sparse24Spec]
T = TypeVar("T")
Path_ = Tuple[Union[str, int], ...]


@dataclass(frozen=True)
class LayerOverride:
    """One ``override_layer_configs`` / ``override_layer_types`` entry, typed."""

    key: str  # layer name or layer type
    line: int
    act: Optional[ActQuantSpec] = None
    weight: Optional[WeightQuantSpec] = None
    prune: Optional[PruneSpec] = None

    @property
    def configures_quant(self) -> bool:
        return self.act is not None or self.weight is not None


@dataclass
class ParsedConfig:
    """The config file's content after syntax and range checks, before it meets a model."""

    path: str
    message: Message
    lines: Dict[Path_, int]
    batch_num: int = 1
    fp16_scale: bool = False
    conv_outputs: bool = True
    act: Optional[ActQuantSpec] = None
    weight: Optional[WeightQuantSpec] = None
    prune: Optional[PruneSpec] = None
    by_name: List[LayerOverride] = field(default_factory=list)
    by_type: List[LayerOverride] = field(default_factory=list)
    skip_layers: List[Tuple[str, int]] = field(default_factory=list)
    skip_types: List[Tuple[str, int]] = field(default_factory=list)
    quant_skip_layers: List[Tuple[str, int]] = field(default_factory=list)
    quant_skip_types: List[Tuple[str, int]] = field(default_factory=list)
    prune_skip_layers: List[Tuple[str, int]] = field(default_factory=list)
    prune_skip_types: List[Tuple[str, int]] = field(default_factory=list)

    def where(self, *path: Union[str, int]) -> str:
        """'file:line' of a field path (or of its closest enclosing field that has a line)."""
        p: Path_ = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        return f"{self.path}:{line}" if line else self.path

    def error(self, path: Path_, text: str) -> ConfigError:
        return ConfigError(f"{self.where(*path)}: field '{_dotted(path)}': {text}")

    @property
    def configures_quant(self) -> bool:
        return self.act is not None or any(o.configures_quant for o in self.by_name + self.by_type)

    @property
    def configures_prune(self) -> bool:
        return self.prune is not None or any(o.prune is not None for o in self.by_name + self.by_type)


def _dotted(path: Path_) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")


# --------------------------------------------------------------------------- line numbers

_TOK = re.compile(r'\s*(#[^\n]*|"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|[^\s{}<>:\[\],;"\'#]+|[{}<>:\[\],;])')


def field_lines(text: str, descriptor, repeats: Optional[List[Tuple[Path_, int, int]]] = None
                ) -> Dict[Path_, int]:
    """Map each field path, e.g. ('override_layer_configs', 1, 'layer_name'), to its line.

    Repeated fields get an index in the path, singular ones do not, as decided by the message
    ``descriptor``. Runs on text that protobuf already parsed, so the grammar can be loose: a name
    followed by ``{``/``<`` (optionally after ``:``) opens a message, a name followed by ``:`` and
    a value is a scalar, list values ``[a, b]`` are repeated entries. A singular field given
    again keeps the line of its last occurrence (the value protobuf keeps); each such repeat is
    appended to ``repeats`` as (path, first line, last line).
    """
    tokens: List[Tuple[str, int]] = []
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    pos = 0
    while True:
        m = _TOK.match(text, pos)
        if not m:
            break
        pos = m.end()
        if not m.group(1).startswith("#"):
            tokens.append((m.group(1), bisect.bisect_right(line_starts, m.start(1))))
    lines: Dict[Path_, int] = {}
    # one frame per open message: (path, descriptor, repeated-field counters)
    stack: List[Tuple[Path_, object, Dict[str, int]]] = [((), descriptor, {})]
    i = 0
    while i < len(tokens):
        tok, line = tokens[i]
        if tok in ("}", ">"):
            stack.pop()
            i += 1
            continue
        prefix, desc, counts = stack[-1]
        fd = desc.fields_by_name.get(tok) if desc is not None else None
        if fd is None:
            i += 1
            continue
        path = prefix + (tok,)
        repeated = _is_repeated(fd)
        if repeated:
            lines.setdefault(path, line)
        j = i + 1
        if j < len(tokens) and tokens[j][0] == ":":
            j += 1
        nxt = tokens[j][0] if j < len(tokens) else ""
        if nxt == "[":
            j += 1
            while j < len(tokens) and tokens[j][0] != "]":
                if tokens[j][0] != ",":
                    lines[_indexed(path, counts, tok)] = tokens[j][1]
                    if fd.message_type is not None:  # list of messages: skip the braces
                        break
                j += 1
            i = j + 1
            continue
        item = _indexed(path, counts, tok) if repeated else path
        if repeats is not None and not repeated and fd.message_type is None and item in lines:
            repeats.append((item, lines[item], line))
        lines[item] = line
        if nxt in ("{", "<"):
            stack.append((item, fd.message_type, {}))
        i = j + 1
    return lines


def _is_repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 6; older releases only have .label
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def _indexed(path: Path_, counts: Dict[str, int], name: str) -> Path_:
    index = counts.get(name, 0)
    counts[name] = index + 1
    return path + (index,)


# --------------------------------------------------------------------------- parsing


def load_config(path: Union[str, "os.PathLike[str]", ParsedConfig]) -> ParsedConfig:
    """Read and check the config file at ``path``; an already parsed config is returned as is
    (so a config built from another format, e.g. AMCT's JSON, goes through the same pipeline).

    Raises:
        ConfigError: missing/unreadable file, syntax error, unknown field or enum value, missing
            required field, or a value out of range; the message names file, line and field.
    """
    if isinstance(path, ParsedConfig):
        return path
    path_s = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if path_s is None:
        raise ConfigError(f"config_defination must be a path to a config file, got {type(path).__name__}")
    text = read_text_file(path_s, "config file", ConfigError,
                          "pass the path of a simple config file (protobuf text format, see README 'Config file')")
    return parse_config_text(text, path_s)


def parse_config_text(text: str, path: str = "<config>") -> ParsedConfig:
    """Parse config ``text``; ``path`` is only used in messages. See :func:`load_config`.

    A singular field given twice in one message keeps its last value, as protobuf's
    ``text_format.Merge`` (and so AMCT) does; slimq logs a warning naming both lines.
    """
    msg = ConfigMessages["AMCTRetrainConfig"]()
    try:
        text_format.Merge(text, msg)
    except text_format.ParseError as exc:
        loc = f"{path}:{exc.GetLine()}" if exc.GetLine() else path
        detail = re.sub(r"^\d+:\d+ : ", "", str(exc))
        raise ConfigError(f"{loc}: {detail}. Fix the line (see the schema in "
                          "slimq/config/retrain_config.proto)") from None
    except (DecodeError, ValueError, UnicodeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{path}: cannot parse config: {exc}") from None
    repeats: List[Tuple[Path_, int, int]] = []
    cfg = ParsedConfig(path=path, message=msg, lines=field_lines(text, msg.DESCRIPTOR, repeats))
    for field_path, first, last in repeats:
        log.warning("slimq: %s:%d: field '%s' is also given on line %d; the last value is used "
                    "(protobuf text format keeps the last one)", path, last, _dotted(field_path), first)
    missing = msg.FindInitializationErrors()
    if missing:
        field_path = _split_init_path(missing[0])
        raise cfg.error(field_path, f"required field '{field_path[-1]}' is missing; add it")
    _fill(cfg, msg)
    return cfg


def _split_init_path(dotted: str) -> Path_:
    out: List[Union[str, int]] = []
    for part in dotted.split("."):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        if m:
            out += [m.group(1), int(m.group(2))]
        else:
            out.append(part)
    return tuple(out)


def _fill(cfg: ParsedConfig, msg: Message) -> None:
    if msg.batch_num < 1:
        raise cfg.error(("batch_num",), "must be >= 1 (number of batches that initialise activation ranges)")
    cfg.batch_num = msg.batch_num
    cfg.fp16_scale = msg.HasField("fakequant_precision_mode")
    cfg.conv_outputs = msg.quantize_conv_outputs
    has_w = msg.HasField("retrain_weight_quant_config")
    if msg.HasField("retrain_data_quant_config") or has_w:
        cfg.act = _act(cfg, msg.retrain_data_quant_config, ("retrain_data_quant_config",))
        cfg.weight = _weight(cfg, msg.retrain_weight_quant_config, ("retrain_weight_quant_config",))
    if msg.HasField("prune_config"):
        cfg.prune = _prune(cfg, msg.prune_config, ("prune_config",))
    for i, o in enumerate(msg.override_layer_configs):
        cfg.by_name.append(_override(cfg, o, o.layer_name, ("override_layer_configs", i)))
    for i, o in enumerate(msg.override_layer_types):
        cfg.by_type.append(_override(cfg, o, o.layer_type, ("override_layer_types", i)))
    _check_unique(cfg, cfg.by_name, "override_layer_configs", "layer")
    _check_unique(cfg, cfg.by_type, "override_layer_types", "type")
    for attr, target in (("skip_layers", cfg.skip_layers), ("skip_layer_types", cfg.skip_types),
                         ("quant_skip_layers", cfg.quant_skip_layers),
                         ("quant_skip_types", cfg.quant_skip_types),
                         ("regular_prune_skip_layers", cfg.prune_skip_layers),
                         ("regular_prune_skip_types", cfg.prune_skip_types)):
        for i, value in enumerate(getattr(msg, attr)):
            if not value.strip():
                raise cfg.error((attr, i), "empty name; remove the entry or write a layer name/type")
            target.append((value, cfg.lines.get((attr, i), 0)))
    if not cfg.configures_quant and not cfg.configures_prune:
        raise ConfigError(
            f"{cfg.path}: nothing to do: configure quantization (retrain_data_quant_config / "
            "retrain_weight_quant_config) or sparsity (prune_config), or both")


def _check_unique(cfg: ParsedConfig, overrides: List[LayerOverride], field_name: str, what: str) -> None:
    """AMCT refuses two override entries for one layer name or type; so does slimq."""
    first: Dict[str, int] = {}
    for o in overrides:
        if o.key in first:
            raise ConfigError(f"{cfg.path}:{o.line}: {field_name}: {what} '{o.key}' is overridden twice "
                              f"(also on line {first[o.key]}); merge the two entries")
        first[o.key] = o.line


def _checked(cfg: ParsedConfig, path: Path_, build: Callable[[], T]) -> T:
    try:
        return build()
    except ConfigError as exc:
        raise cfg.error(path, str(exc)) from None


def _act(cfg: ParsedConfig, m: Message, path: Path_) -> ActQuantSpec:
    ulq = m.ulq_quantize
    p = path + ("ulq_quantize",)
    clip_max = clip_min = None
    if ulq.HasField("clip_max_min"):
        clip_max, clip_min = ulq.clip_max_min.clip_max, ulq.clip_max_min.clip_min
        if math.isnan(clip_max) or math.isnan(clip_min):
            raise cfg.error(p + ("clip_max_min",), "clip_max/clip_min must be numbers, not nan")
    fixed_min = ulq.fixed_min if ulq.HasField("fixed_min") else None
    if fixed_min and clip_min is not None:
        clip_min = 0.0  # fixed_min pins the lower clip at 0 whatever clip_min says
    return _checked(cfg, p + ("clip_max_min",) if clip_max is not None else p,
                    lambda: ActQuantSpec(bits=_DTYPE_NAMES[ulq.dst_type], clip_max=clip_max,
                                         clip_min=clip_min, fixed_min=fixed_min,
                                         fp16_scale=cfg.fp16_scale))


def _weight(cfg: ParsedConfig, m: Message, path: Path_) -> WeightQuantSpec:
    algo = m.WhichOneof("weights_retrain_algo") or "arq_retrain"
    sub = getattr(m, algo)
    return _checked(cfg, path + (algo,),
                    lambda: WeightQuantSpec(algo="arq" if algo == "arq_retrain" else "ulq",
                                            bits=_DTYPE_NAMES[sub.dst_type],
                                            channel_wise=sub.channel_wise))


def _prune(cfg: ParsedConfig, m: Message, path: Path_) -> PruneSpec:
    strategy = m.WhichOneof("regular_prune_strategy")
    if strategy is None:
        raise cfg.error(path, "empty prune_config; add filter_pruner { balanced_l2_norm_filter_prune "
                              "{ prune_ratio: 0.3 } } or n_out_of_m_pruner { l1_selective_prune {} }")
    if strategy == "filter_pruner":
        if m.filter_pruner.WhichOneof("filter_pruner_algo") is None:
            raise cfg.error(path + (strategy,), "add balanced_l2_norm_filter_prune { prune_ratio: ... }")
        algo = m.filter_pruner.balanced_l2_norm_filter_prune
        p = path + (strategy, "balanced_l2_norm_filter_prune", "prune_ratio")
        ratio = algo.prune_ratio
        if math.isnan(ratio) or not 0.0 < ratio < 1.0:
            raise cfg.error(p, f"prune_ratio must be strictly between 0 and 1, got {ratio:g}")
        return _checked(cfg, p, lambda: ChannelPruneSpec(ratio=float(ratio),
                                                         ascend_optimized=algo.ascend_optimized))
    if m.n_out_of_m_pruner.WhichOneof("n_out_of_m_pruner_algo") is None:
        raise cfg.error(path + (strategy,), "add l1_selective_prune { n_out_of_m_type: M4N2 }")
    algo = m.n_out_of_m_pruner.l1_selective_prune
    return _checked(cfg, path + (strategy, "l1_selective_prune"),
                    lambda: Sparse24Spec(update_freq=algo.update_freq))


def _override(cfg: ParsedConfig, m: Message, key: str, path: Path_) -> LayerOverride:
    if not key.strip():
        raise cfg.error(path, "empty layer name/type")
    has_a, has_w = m.HasField("retrain_data_quant_config"), m.HasField("retrain_weight_quant_config")
    act = _act(cfg, m.retrain_data_quant_config, path + ("retrain_data_quant_config",)) if has_a else None
    weight = (_weight(cfg, m.retrain_weight_quant_config, path + ("retrain_weight_quant_config",))
              if has_w else None)
    prune = _prune(cfg, m.prune_config, path + ("prune_config",)) if m.HasField("prune_config") else None
    if act is None and weight is None and prune is None:
        raise cfg.error(path, f"override for '{key}' configures nothing; add a quant or prune config")
    return LayerOverride(key=key, line=cfg.lines.get(path, 0), act=act, weight=weight, prune=prune)


# --------------------------------------------------------------------------- feature checks

_QUANT_FIELDS = ("retrain_data_quant_config", "retrain_weight_quant_config", "quant_skip_layers",
                 "quant_skip_types")
_PRUNE_FIELDS = ("prune_config", "regular_prune_skip_layers", "regular_prune_skip_types")


def _present(cfg: ParsedConfig, field_name: str) -> bool:
    # either global quant message sets both cfg.act and cfg.weight: name the one the file has
    quant = cfg.act is not None or cfg.weight is not None
    data_line = ("retrain_data_quant_config",) in cfg.lines or ("retrain_weight_quant_config",) not in cfg.lines
    return {
        "retrain_data_quant_config": quant and data_line,
        "retrain_weight_quant_config": quant and not data_line,
        "quant_skip_layers": bool(cfg.quant_skip_layers),
        "quant_skip_types": bool(cfg.quant_skip_types),
        "prune_config": cfg.prune is not None,
        "regular_prune_skip_layers": bool(cfg.prune_skip_layers),
        "regular_prune_skip_types": bool(cfg.prune_skip_types),
    }[field_name]


def require_features(cfg: ParsedConfig, *, quant: bool, prune: bool, entry: str) -> ParsedConfig:
    """``cfg`` if it configures only what ``entry`` does (quantization and/or sparsity).

    AMCT's prune-only and quant-only entry points refuse a config with fields of the other
    feature (its ``check_field``); so do slimq's.

    Raises:
        ConfigError: naming the file, the line and the first field of the other feature.
    """
    fields = (() if quant else _QUANT_FIELDS) + (() if prune else _PRUNE_FIELDS)
    feature = "quantization" if not quant else "sparsity"
    for field_name in fields:
        if _present(cfg, field_name):
            raise ConfigError(f"{cfg.where(field_name)}: field '{field_name}' configures {feature}, which "
                              f"{entry} does not do; remove it, or use create_compressed_retrain_model")
    for overrides, field_name in ((cfg.by_name, "override_layer_configs"), (cfg.by_type, "override_layer_types")):
        for o in overrides:
            if (not quant and o.configures_quant) or (not prune and o.prune is not None):
                raise ConfigError(f"{cfg.path}:{o.line}: {field_name} '{o.key}' configures {feature}, which "
                                  f"{entry} does not do; remove that part, or use "
                                  "create_compressed_retrain_model")
    return cfg
