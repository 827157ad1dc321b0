"""Read, edit and atomically write the record file (``ScaleOffsetRecord``, protobuf text format).

:class:`Record` wraps the protobuf message itself, so entries slimq does not interpret (written by
AMCT or by another feature) survive every read-modify-write. Typed dataclasses are what the rest
of slimq exchanges with it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from .._io import atomic_write_text, check_writable_dir, read_text_file
from .._proto import load_proto
from ..errors import RecordError
from .amct_nodes import is_op_node

__all__ = [
    "OUTPUT_SUFFIX",
    "INPUT_SUFFIX",
    "point_module",
    "RecordMessages",
    "QuantFactors",
    "PruneNodeInfo",
    "ChannelPruneInfo",
    "SelectiveMaskInfo",
    "Record",
    "read_record",
    "write_record",
    "pack_mask",
    "unpack_mask",
]

RecordMessages = load_proto("slimq.record", "scale_offset_record.proto")
OUTPUT_SUFFIX = ":output"  # record key of a module's output quantizer: "<module>:output"
INPUT_SUFFIX = ":input"  # record key of a quantizer on a module's input: "<module>:input"


def point_module(key: str) -> Optional[str]:
    """The module an ``<module>:output`` / ``<module>:input`` record key belongs to (None for a
    quantized layer's own entry)."""
    for suffix in (OUTPUT_SUFFIX, INPUT_SUFFIX):
        if key.endswith(suffix):
            return key[:-len(suffix)]
    return None
_Attr = RecordMessages["AttrProto"]


@dataclass(frozen=True)
class QuantFactors:
    """One quantized layer's factors as AMCT records them (scale_w has one entry per channel
    when channel-wise, else one)."""

    scale_d: float
    offset_d: int
    scale_w: Tuple[float, ...]
    offset_w: Tuple[int, ...]
    shift_bit: Tuple[int, ...] = ()
    act_type: str = "INT8"
    wts_type: str = "INT8"
    fp16_scale: bool = False


@dataclass(frozen=True)
class PruneNodeInfo:
    """A producer or consumer of one pruned channel group.

    ``begin``/``end`` is the node's channel range inside the group's channel axis of the module
    (e.g. a concat input's offset); ``prune_index`` holds the removed channels, absolute (already
    offset by ``begin``).
    """

    name: str
    type: str
    begin: int
    end: int
    prune_index: Tuple[int, ...]


@dataclass(frozen=True)
class ChannelPruneInfo:
    producers: Tuple[PruneNodeInfo, ...]
    consumers: Tuple[PruneNodeInfo, ...]


@dataclass(frozen=True)
class SelectiveMaskInfo:
    """A 2:4 mask: ``mask`` is a 0/1 uint8 array of ``mask_shape`` (the weight's shape)."""

    name: str
    mask_shape: Tuple[int, ...]
    mask: np.ndarray = field(compare=False)


# --------------------------------------------------------------------------- packing


def pack_mask(mask: np.ndarray) -> List[int]:
    """AMCT's packing: numpy packbits (MSB first) of the flat 0/1 mask, zero-padded to whole
    8-byte words, read as little-endian int64."""
    packed = np.packbits(np.asarray(mask).reshape(-1) != 0)
    if len(packed) % 8:
        packed = np.concatenate([packed, np.zeros(8 - len(packed) % 8, dtype=np.uint8)])
    return np.frombuffer(packed.tobytes(), dtype="<i8").tolist()


def unpack_mask(words: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_mask`; returns a uint8 0/1 array of ``shape``."""
    size = int(np.prod(shape)) if len(shape) else 1
    raw = np.asarray(list(words), dtype="<i8").tobytes()
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
    if bits.size < size:
        raise RecordError(f"selective_mask holds {bits.size} bits but mask_shape {list(shape)} needs {size}")
    return bits[:size].reshape(tuple(shape))


# --------------------------------------------------------------------------- attributes


def _attrs(node) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for a in node.attr:
        kind = _Attr.AttrType.Name(a.type) if a.HasField("type") else "UNDEFINED"
        out[a.name] = {
            "FLOAT": a.f, "INT": a.i, "STRING": a.s.decode("utf-8", "replace"),
            "FLOATS": list(a.floats), "INTS": list(a.ints),
            "STRINGS": [s.decode("utf-8", "replace") for s in a.strings],
        }.get(kind)
    return out


def _set_attr(node, name: str, value: Union[int, str, Sequence[int]]) -> None:
    a = node.attr.add(name=name)
    if isinstance(value, str):
        a.type, a.s = _Attr.STRING, value.encode("utf-8")
    elif isinstance(value, (int, np.integer)):
        a.type, a.i = _Attr.INT, int(value)
    else:
        a.type = _Attr.INTS
        a.ints.extend(map(int, value))


# --------------------------------------------------------------------------- record


def _not_a_record(text: str) -> str:
    """Why text does not parse as a record: a simple config file, or a corrupt record."""
    from ..config.load import ConfigMessages  # only for this message

    try:
        text_format.Merge(text, ConfigMessages["AMCTRetrainConfig"]())
        return "this is a simple config file, not a record file"
    except Exception:  # noqa: BLE001 - any failure means it is not a config either
        return "record file is corrupt or not a ScaleOffsetRecord"


class Record:
    """The content of one record file: quant factors, channel-prune groups and 2:4 masks."""

    def __init__(self, message=None) -> None:
        self.message = message if message is not None else RecordMessages["ScaleOffsetRecord"]()

    # -- quantization ---------------------------------------------------------------------
    def quant_layers(self) -> List[str]:
        return [e.key for e in self.message.record if e.HasField("value")]

    def quant(self, name: str) -> Optional[QuantFactors]:
        for e in self.message.record:
            if e.key == name and e.HasField("value"):
                v = e.value
                return QuantFactors(scale_d=v.scale_d, offset_d=v.offset_d, scale_w=tuple(v.scale_w),
                                    offset_w=tuple(v.offset_w), shift_bit=tuple(v.shift_bit),
                                    act_type=v.act_type, wts_type=v.wts_type,
                                    fp16_scale=v.fakequant_precision_mode == "FORCE_FP16_QUANT")
        return None

    def set_quant(self, name: str, f: QuantFactors) -> None:
        entry = next((e for e in self.message.record if e.key == name), None)
        if entry is None:
            entry = self.message.record.add(key=name)
        v = entry.value
        v.Clear()
        v.scale_d, v.offset_d = float(f.scale_d), int(f.offset_d)
        v.scale_w.extend(float(s) for s in f.scale_w)
        v.offset_w.extend(int(o) for o in f.offset_w)
        v.shift_bit.extend(int(n) for n in f.shift_bit)
        v.act_type, v.wts_type = f.act_type, f.wts_type
        if f.fp16_scale:
            v.fakequant_precision_mode = "FORCE_FP16_QUANT"

    # -- channel pruning ------------------------------------------------------------------
    def channel_prunes(self) -> List[ChannelPruneInfo]:
        """The channel-pruning groups; nodes AMCT writes for graph operators (``Add_8``), which
        hold nothing to slice, are left out (they stay in the message)."""
        out = []
        for pr in self.message.prune_record:
            producers = tuple(i for i in map(self._node, pr.producer) if not is_op_node(i.name, i.type))
            if producers:
                out.append(ChannelPruneInfo(producers, tuple(
                    i for i in map(self._node, pr.consumer) if not is_op_node(i.name, i.type))))
        return out

    @staticmethod
    def _node(n) -> PruneNodeInfo:
        a = _attrs(n)
        try:
            return PruneNodeInfo(name=n.name, type=str(a.get("type", "")), begin=int(a["begin"]),
                                 end=int(a["end"]), prune_index=tuple(int(i) for i in a.get("prune_index") or ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"prune record node '{n.name}' lacks a valid begin/end attribute") from exc

    def set_channel_prunes(self, groups: Iterable[ChannelPruneInfo]) -> None:
        """Replace every channel-pruning entry; 2:4 entries are kept."""
        keep = [pr for pr in self.message.prune_record if not pr.producer]
        del self.message.prune_record[:]
        for g in groups:
            pr = self.message.prune_record.add()
            for src, dst in ((g.producers, pr.producer), (g.consumers, pr.consumer)):
                for info in src:
                    node = dst.add(name=info.name)
                    _set_attr(node, "type", info.type)
                    _set_attr(node, "begin", info.begin)
                    _set_attr(node, "end", info.end)
                    _set_attr(node, "prune_index", list(info.prune_index))
        for pr in keep:
            self.message.prune_record.add().CopyFrom(pr)

    # -- 2:4 ------------------------------------------------------------------------------
    def selective_masks(self) -> Dict[str, SelectiveMaskInfo]:
        out: Dict[str, SelectiveMaskInfo] = {}
        for pr in self.message.prune_record:
            if not pr.HasField("selective_prune"):
                continue
            node = pr.selective_prune
            a = _attrs(node)
            shape = tuple(int(s) for s in (a.get("mask_shape") or ()))
            if not shape:
                raise RecordError(f"selective_prune record of '{node.name}' has no mask_shape")
            words = a.get("selective_mask")
            mask = (unpack_mask(words, shape) if words else np.ones(shape, dtype=np.uint8))
            out[node.name] = SelectiveMaskInfo(node.name, shape, mask)
        return out

    def set_selective_mask(self, info: SelectiveMaskInfo) -> None:
        for pr in self.message.prune_record:
            if pr.HasField("selective_prune") and pr.selective_prune.name == info.name:
                pr.selective_prune.Clear()
                node = pr.selective_prune
                break
        else:
            node = self.message.prune_record.add().selective_prune
        node.name = info.name
        _set_attr(node, "mask_shape", list(info.mask_shape))
        _set_attr(node, "selective_mask", pack_mask(info.mask))

    # -- text -----------------------------------------------------------------------------
    def to_text(self) -> str:
        # `ints: [1, 2, 3]` instead of one line per index: standard text format, much shorter
        return _message_to_text(self.message)

    @classmethod
    def from_text(cls, text: str, path: str = "<record>") -> "Record":
        msg = RecordMessages["ScaleOffsetRecord"]()
        try:
            text_format.Parse(text, msg)
        except text_format.ParseError as exc:
            raise RecordError(f"{path}: {_not_a_record(text)} ({exc}); restore needs the record file that "
                              "create_compressed_retrain_model wrote for this model") from None
        except (DecodeError, ValueError, UnicodeError, OverflowError, RecursionError) as exc:
            raise RecordError(f"{path}: record file cannot be parsed ({exc})") from None
        missing = msg.FindInitializationErrors()
        if missing:
            raise RecordError(f"{path}: record file lacks required field '{missing[0]}'")
        return cls(msg)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and self.message == other.message


_INT_TYPES = frozenset((FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
                        FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64))


class _ShortIntsPrinter(getattr(text_format, "_Printer", object)):
    """protobuf's text printer, writing a repeated integer field in one ``join`` instead of one
    Python call per element (a pruned ResNet-50's record holds ~20k channel indices; printing
    them was a tenth of create). The output is MessageToString's, character for character."""

    def _PrintShortRepeatedPrimitivesValue(self, field, value):
        if field.cpp_type not in _INT_TYPES:
            return super()._PrintShortRepeatedPrimitivesValue(field, value)
        self._PrintFieldName(field)
        self.out.write(" [" + ", ".join(map(str, value)) + "]")
        self.out.write(" " if self.as_one_line else "\n")


def _message_to_text(message: Any) -> str:
    """``text_format.MessageToString(message, as_utf8=True, use_short_repeated_primitives=True)``."""
    if _ShortIntsPrinter.__mro__[1] is object:  # a protobuf without the private printer class
        return text_format.MessageToString(message, as_utf8=True, use_short_repeated_primitives=True)
    out = text_format.TextWriter(True)
    _ShortIntsPrinter(out, as_utf8=True, use_short_repeated_primitives=True).PrintMessage(message)
    text = out.getvalue()
    out.close()
    return text


def read_record(path: Union[str, "os.PathLike[str]"]) -> Record:
    """Load the record file at ``path``.

    Raises:
        RecordError: missing, unreadable, not UTF-8, or not a valid ``ScaleOffsetRecord``.
    """
    p = os.fspath(path)
    text = read_text_file(p, "record file", RecordError,
                          "pass the record_file that create_compressed_retrain_model wrote")
    return Record.from_text(text, p)


def write_record(path: Union[str, "os.PathLike[str]"], record: Record) -> None:
    """Atomically replace ``path`` with ``record`` (readers see the old file or the new one)."""
    p = check_writable_dir(path, "record file", RecordError)
    atomic_write_text(p, record.to_text())
