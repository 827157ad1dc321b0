"""AMCT's per-layer JSON quantization-aware-training config (``create_quant_retrain_config``).

The format, as AMCT writes and reads it::

    {
        "version": 1,
        "batch_num": 1,
        "fakequant_precision_mode": "FORCE_FP16_QUANT",        (optional)
        "conv1": {
            "retrain_enable": true,
            "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 6.0, "clip_min": -6.0,
                                    "fixed_min": false, "dst_type": "INT8"},
            "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": true,
                                      "dst_type": "INT8"}
        },
        ...
    }

Every key other than the global ones is a layer name (``model.named_modules()``). A layer with
``retrain_enable: false`` or absent from the file is not quantized. slimq adds one optional global
key, ``"quantize_conv_outputs": false`` (written only when the simple config turned that slimq
extension off). Reading turns the file into a :class:`ParsedConfig` with one by-name override
per enabled layer, so it goes through the same resolution and pipeline as a simple config file.
"""
from __future__ import annotations

import bisect

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .._io import atomic_write_text
from ..errors import ConfigError
from .load import ConfigMessages, LayerOverride, ParsedConfig
from .plan import BITS_BY_TYPE, ActQuantSpec, WeightQuantSpec

__all__ = ["JsonLayer", "quant_json_text", "write_quant_json", "read_quant_json", "parse_quant_json"]

_GLOBAL_KEYS = ("version", "batch_num", "fakequant_precision_mode", "quantize_conv_outputs")
_LAYER_KEYS = ("retrain_enable", "retrain_data_config", "retrain_weight_config")
_PRUNE_KEYS = ("regular_prune_enable", "regular_prune_config")
_DATA_KEYS = ("algo", "clip_max", "clip_min", "fixed_min", "dst_type")
_WEIGHT_KEYS = ("algo", "channel_wise", "dst_type")
_WEIGHT_ALGOS = {"arq_retrain": "arq", "ulq_retrain": "ulq"}
_PRECISION_MODES = ("DEFAULT", "FORCE_FP16_QUANT")
Path_ = Tuple[str, ...]


@dataclass(frozen=True)
class JsonLayer:
    """One quantizable layer as the JSON config lists it."""

    name: str
    act: ActQuantSpec
    weight: WeightQuantSpec
    enabled: bool = True


# --------------------------------------------------------------------------- writing


def _data_entry(act: ActQuantSpec) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"algo": "ulq_quantize"}
    if act.clip_max is not None:
        entry["clip_max"], entry["clip_min"] = float(act.clip_max), float(act.clip_min)
    if act.fixed_min is not None:
        entry["fixed_min"] = bool(act.fixed_min)
    entry["dst_type"] = act.dtype
    return entry


def _weight_entry(weight: WeightQuantSpec) -> Dict[str, Any]:
    algo = next(k for k, v in _WEIGHT_ALGOS.items() if v == weight.algo)
    return {"algo": algo, "channel_wise": bool(weight.channel_wise), "dst_type": weight.dtype}


def quant_json_text(layers: Sequence[JsonLayer], batch_num: int = 1, fp16_scale: bool = False,
                    conv_outputs: bool = True) -> str:
    """The JSON text for ``layers`` (AMCT's layout: 4-space indent, ``,``/``:`` separators)."""
    doc: Dict[str, Any] = {"version": 1, "batch_num": int(batch_num)}
    if fp16_scale:
        doc["fakequant_precision_mode"] = "FORCE_FP16_QUANT"
    if not conv_outputs:
        doc["quantize_conv_outputs"] = False
    for layer in layers:
        doc[layer.name] = {"retrain_enable": bool(layer.enabled),
                           "retrain_data_config": _data_entry(layer.act),
                           "retrain_weight_config": _weight_entry(layer.weight)}
    return json.dumps(doc, indent=4, separators=(",", ":")) + "\n"


def write_quant_json(path: Union[str, "os.PathLike[str]"], layers: Sequence[JsonLayer], batch_num: int = 1,
                     fp16_scale: bool = False, conv_outputs: bool = True) -> None:
    """Atomically (re)write the JSON config at ``path``; an existing file is replaced, as in AMCT."""
    atomic_write_text(path, quant_json_text(layers, batch_num, fp16_scale, conv_outputs))


# --------------------------------------------------------------------------- line numbers

_JSON_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


def key_lines(text: str) -> Dict[Path_, int]:
    """Line of every object key, by its path of keys (keys inside arrays are not mapped)."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    tokens = [(m.group(0), _line_of(line_starts, m.start())) for m in _JSON_TOKEN.finditer(text)]
    out: Dict[Path_, int] = {}
    stack: List[Optional[Path_]] = []  # path of each open object, None for arrays
    pending: Optional[Path_] = None  # path of the key whose value comes next
    for i, (tok, line) in enumerate(tokens):
        if tok == "{":
            stack.append(pending if pending is not None else (() if not stack else None))
            pending = None
        elif tok == "[":
            stack.append(None)
            pending = None
        elif tok in ("}", "]"):
            if stack:
                stack.pop()
        elif tok.startswith('"') and i + 1 < len(tokens) and tokens[i + 1][0] == ":" and stack and stack[-1] is not None:
            try:
                key = json.loads(tok)
            except ValueError:
                continue
            pending = stack[-1] + (key,)
            out.setdefault(pending, line)
        elif tok not in (":", ","):
            pending = None
    return out


def _line_of(starts: List[int], offset: int) -> int:
    """1-based line of ``offset``, given the offsets at which lines start."""
    return bisect.bisect_right(starts, offset)


# --------------------------------------------------------------------------- reading


class _Reader:
    """Checks one JSON document; every error names the file, the line and the field."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = key_lines(text)

    def error(self, path: Path_, text: str) -> ConfigError:
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: field '{'.'.join(path)}': {text}")

    def keys(self, obj: Any, path: Path_, allowed: Sequence[str], what: str) -> Mapping[str, Any]:
        if not isinstance(obj, dict):
            raise self.error(path, f"{what} must be a JSON object, got {_json_type(obj)}")
        unknown = [k for k in obj if k not in allowed]
        if unknown:
            raise self.error(path + (unknown[0],), f"unknown field; {what} takes {', '.join(allowed)}")
        return obj

    def typed(self, obj: Mapping[str, Any], key: str, path: Path_, check: Callable[[Any], bool],
              expected: str, default: Any = None) -> Any:
        if key not in obj:
            return default
        value = obj[key]
        if not check(value):
            raise self.error(path + (key,), f"must be {expected}, got {json.dumps(value)}")
        return value

    def data_config(self, obj: Any, path: Path_, fp16: bool) -> ActQuantSpec:
        obj = self.keys(obj, path, _DATA_KEYS, "retrain_data_config")
        self.typed(obj, "algo", path, lambda v: v == "ulq_quantize", '"ulq_quantize"')
        clip_max = self.typed(obj, "clip_max", path, _is_number, "a number")
        clip_min = self.typed(obj, "clip_min", path, _is_number, "a number")
        fixed_min = self.typed(obj, "fixed_min", path, _is_bool, "true or false")
        bits = self.dst_type(obj, path)
        if (clip_max is None) != (clip_min is None):
            missing = "clip_min" if clip_min is None else "clip_max"
            raise self.error(path, f"'{missing}' is missing; clip_max and clip_min go together")
        if fixed_min and clip_min is not None:
            clip_min = 0.0  # fixed_min pins the lower clip at 0, as in the simple config file
        try:
            return ActQuantSpec(bits=bits, clip_max=None if clip_max is None else float(clip_max),
                                clip_min=None if clip_min is None else float(clip_min),
                                fixed_min=fixed_min, fp16_scale=fp16)
        except ConfigError as exc:
            raise self.error(path, str(exc)) from None

    def weight_config(self, obj: Any, path: Path_) -> WeightQuantSpec:
        obj = self.keys(obj, path, _WEIGHT_KEYS, "retrain_weight_config")
        algo = self.typed(obj, "algo", path, lambda v: v in _WEIGHT_ALGOS,
                          " or ".join(f'"{a}"' for a in _WEIGHT_ALGOS), default="arq_retrain")
        channel_wise = self.typed(obj, "channel_wise", path, _is_bool, "true or false", default=True)
        return WeightQuantSpec(algo=_WEIGHT_ALGOS[algo], bits=self.dst_type(obj, path), channel_wise=channel_wise)

    def dst_type(self, obj: Mapping[str, Any], path: Path_) -> int:
        name = self.typed(obj, "dst_type", path, lambda v: v in BITS_BY_TYPE,
                          " or ".join(f'"{t}"' for t in BITS_BY_TYPE), default="INT8")
        return BITS_BY_TYPE[name]

    def layer(self, name: str, obj: Any, fp16: bool) -> Optional[Tuple[ActQuantSpec, WeightQuantSpec]]:
        path = (name,)
        if isinstance(obj, dict):
            prune = [k for k in obj if k in _PRUNE_KEYS]
            if prune:
                raise self.error(path + (prune[0],), "sparsity is not configured in the quantization "
                                 "retrain config; configure it in the simple config file of "
                                 "create_prune_retrain_model or create_compressed_retrain_model")
        obj = self.keys(obj, path, _LAYER_KEYS, f"layer '{name}'")
        enabled = self.typed(obj, "retrain_enable", path, _is_bool, "true or false", default=True)
        act = self.data_config(obj.get("retrain_data_config", {}), path + ("retrain_data_config",), fp16)
        weight = self.weight_config(obj.get("retrain_weight_config", {}), path + ("retrain_weight_config",))
        return (act, weight) if enabled else None


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number")


def _unique_keys(path: str, text: str) -> Callable[[List[Tuple[str, Any]]], Dict[str, Any]]:
    lines = key_lines(text)

    def hook(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                found = [ln for p, ln in lines.items() if p and p[-1] == key]
                where = f"{path}:{found[0]}" if len(found) == 1 else path
                raise ConfigError(f"{where}: key '{key}' appears twice in one JSON object; keep one")
            out[key] = value
        return out
    return hook


def parse_quant_json(text: str, path: str = "<config.json>") -> ParsedConfig:
    """Check the JSON config ``text`` and turn it into a :class:`ParsedConfig`.

    Raises:
        ConfigError: not JSON, a repeated key, an unknown or prune field, a wrong type or value,
            no layer enabled; the message names the file, the line and the field.
    """
    try:
        doc = json.loads(text, object_pairs_hook=_unique_keys(path, text))
    except json.JSONDecodeError as exc:
        hint = ("; this looks like a simple config file: pass it as config_defination of "
                "create_quant_retrain_config, which writes the JSON") if not text.lstrip().startswith("{") else ""
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}){hint}") from None
    reader = _Reader(path, text)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the quantization retrain config must be a JSON object, got {_json_type(doc)}")
    reader.typed(doc, "version", (), lambda v: v == 1 and not isinstance(v, bool), "1")
    batch_num = reader.typed(doc, "batch_num", (), lambda v: isinstance(v, int) and not isinstance(v, bool)
                             and v >= 1, "an integer >= 1", default=1)
    mode = reader.typed(doc, "fakequant_precision_mode", (), lambda v: v in _PRECISION_MODES,
                        " or ".join(f'"{m}"' for m in _PRECISION_MODES), default="DEFAULT")
    conv_outputs = reader.typed(doc, "quantize_conv_outputs", (), _is_bool, "true or false", default=True)
    fp16 = mode == "FORCE_FP16_QUANT"
    cfg = ParsedConfig(path=path, message=ConfigMessages["AMCTRetrainConfig"](), lines={},
                       batch_num=batch_num, fp16_scale=fp16, conv_outputs=conv_outputs)
    for name, entry in doc.items():
        if name in _GLOBAL_KEYS:
            continue
        if not name.strip():
            raise reader.error((name,), "empty layer name")
        specs = reader.layer(name, entry, fp16)
        if specs is not None:
            line = reader.lines.get((name,), 0)
            cfg.lines[("override_layer_configs", len(cfg.by_name))] = line
            cfg.by_name.append(LayerOverride(key=name, line=line, act=specs[0], weight=specs[1]))
    if not cfg.by_name:
        raise ConfigError(f"{path}: no layer has retrain_enable: true; nothing to quantize")
    return cfg


def read_quant_json(path: Union[str, "os.PathLike[str]"]) -> ParsedConfig:
    """Read the JSON config at ``path`` (see :func:`parse_quant_json`).

    Raises:
        ConfigError: missing or unreadable file, or what :func:`parse_quant_json` refuses.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"config_file must be the path of the JSON file written by "
                          f"create_quant_retrain_config, got {type(path).__name__}")
    p = os.fspath(path)
    if not os.path.isfile(p):
        what = "is a folder" if os.path.isdir(p) else "does not exist"
        raise ConfigError(f"config file '{p}' {what}; write it with create_quant_retrain_config(config_file, "
                          "model, input_data)")
    try:
        with open(p, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: config file is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"config file '{p}' cannot be read: {exc.strerror}") from exc
    return parse_quant_json(text, p)
