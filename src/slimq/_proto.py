"""Load a shipped ``.proto`` schema into protobuf message classes at import time.

Why not generated ``*_pb2.py`` files: generated code is tied to the protobuf release that made
it, and protobuf refuses gencode from too old or too new a release. Building the descriptor
from the ``.proto`` text with the stable ``descriptor_pb2`` API works with every protobuf >= 3.20,
and keeps the human-readable schema the single source of truth.

Only the proto2 subset our schemas use is understood: ``syntax``, ``package``, ``message``
(nested), ``enum`` (nested), ``oneof``, ``optional``/``required``/``repeated`` fields with
``[default = ...]``, and comments. Anything else raises, so the schema cannot silently drift.
"""
from __future__ import annotations

import re
from importlib import resources
from typing import Dict, Iterator, List, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["load_proto"]

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _FDP.TYPE_DOUBLE, "float": _FDP.TYPE_FLOAT, "int64": _FDP.TYPE_INT64,
    "uint64": _FDP.TYPE_UINT64, "int32": _FDP.TYPE_INT32, "uint32": _FDP.TYPE_UINT32,
    "bool": _FDP.TYPE_BOOL, "string": _FDP.TYPE_STRING, "bytes": _FDP.TYPE_BYTES,
    "sint32": _FDP.TYPE_SINT32, "sint64": _FDP.TYPE_SINT64,
}
_LABELS = {"optional": _FDP.LABEL_OPTIONAL, "required": _FDP.LABEL_REQUIRED,
           "repeated": _FDP.LABEL_REPEATED}
_TOKEN = re.compile(r'\s*(//[^\n]*|/\*.*?\*/|"[^"]*"|\'[^\']*\'|[A-Za-z_][\w.]*|-?[\d.]+(?:[eE][-+]?\d+)?|[{}\[\]=;<>,])',
                    re.S)


def _tokens(text: str) -> Iterator[str]:
    pos = 0
    while text[pos:].strip():
        m = _TOKEN.match(text, pos)
        if not m:
            raise SyntaxError(f"unexpected text in .proto at offset {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        tok = m.group(1)
        if not tok.startswith(("//", "/*")):
            yield tok


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = list(_tokens(text))
        self.i = 0
        self.package = ""
        # (descriptor, fully qualified scope) pairs whose type names are resolved at the end
        self.pending: List[Tuple[descriptor_pb2.FieldDescriptorProto, str]] = []
        self.messages: Dict[str, str] = {}  # full name -> "message" | "enum"

    def next(self) -> str:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, want: str) -> None:
        got = self.next()
        if got != want:
            raise SyntaxError(f".proto: expected {want!r}, got {got!r}")

    def parse(self, name: str) -> descriptor_pb2.FileDescriptorProto:
        fdp = descriptor_pb2.FileDescriptorProto(name=name, syntax="proto2")
        while self.i < len(self.toks):
            tok = self.next()
            if tok == "syntax":
                self.expect("=")
                if self.next().strip("'\"") != "proto2":
                    raise SyntaxError(".proto: only proto2 schemas are supported")
                self.expect(";")
            elif tok == "package":
                self.package = self.next()
                fdp.package = self.package
                self.expect(";")
            elif tok == "message":
                self._message(fdp.message_type.add(), self.package)
            elif tok == "enum":
                self._enum(fdp.enum_type.add(), self.package)
            else:
                raise SyntaxError(f".proto: unsupported top-level token {tok!r}")
        for field, scope in self.pending:
            field.type_name, kind = self._resolve(field.type_name, scope)
            field.type = _FDP.TYPE_MESSAGE if kind == "message" else _FDP.TYPE_ENUM
        return fdp

    def _message(self, msg: descriptor_pb2.DescriptorProto, scope: str) -> None:
        msg.name = self.next()
        full = f"{scope}.{msg.name}" if scope else msg.name
        self.messages[full] = "message"
        self.expect("{")
        while (tok := self.next()) != "}":
            if tok == "message":
                self._message(msg.nested_type.add(), full)
            elif tok == "enum":
                self._enum(msg.enum_type.add(), full)
            elif tok == "oneof":
                index = len(msg.oneof_decl)
                msg.oneof_decl.add(name=self.next())
                self.expect("{")
                while (t := self.next()) != "}":
                    self._field(msg.field.add(), full, "optional", t, oneof=index)
            elif tok in _LABELS:
                self._field(msg.field.add(), full, tok, self.next())
            else:
                raise SyntaxError(f".proto: unsupported token {tok!r} in message {full}")

    def _enum(self, enum: descriptor_pb2.EnumDescriptorProto, scope: str) -> None:
        enum.name = self.next()
        self.messages[f"{scope}.{enum.name}" if scope else enum.name] = "enum"
        self.expect("{")
        while (tok := self.next()) != "}":
            self.expect("=")
            enum.value.add(name=tok, number=int(self.next()))
            self.expect(";")

    def _field(self, field: descriptor_pb2.FieldDescriptorProto, scope: str, label: str,
               type_name: str, oneof: int = -1) -> None:
        field.label = _LABELS[label]
        field.name = self.next()
        self.expect("=")
        field.number = int(self.next())
        if oneof >= 0:
            field.oneof_index = oneof
        if type_name in _SCALARS:
            field.type = _SCALARS[type_name]
        else:
            field.type_name = type_name
            self.pending.append((field, scope))
        tok = self.next()
        if tok == "[":
            self.expect("default")
            self.expect("=")
            field.default_value = self.next().strip("'\"")
            self.expect("]")
            tok = self.next()
        if tok != ";":
            raise SyntaxError(f".proto: expected ';' after field {field.name}, got {tok!r}")

    def _resolve(self, name: str, scope: str) -> Tuple[str, str]:
        """Protobuf scoping: innermost enclosing scope first."""
        parts = scope.split(".") if scope else []
        while True:
            candidate = ".".join(parts + [name])
            if candidate in self.messages:
                return "." + candidate, self.messages[candidate]
            if not parts:
                raise SyntaxError(f".proto: unknown type {name!r} used in {scope}")
            parts.pop()


def load_proto(package: str, filename: str) -> Dict[str, type]:
    """Parse ``filename`` shipped in ``package`` and return {message name: message class}.

    Each schema gets its own descriptor pool, so loading never clashes with another library that
    registered the same package name in protobuf's default pool.
    """
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    fdp = _Parser(text).parse(filename)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    classes: Dict[str, type] = {}

    def collect(desc) -> None:
        classes[desc.name] = message_factory.GetMessageClass(desc)
        for nested in desc.nested_types:
            collect(nested)

    for msg in fdp.message_type:
        collect(pool.FindMessageTypeByName(f"{fdp.package}.{msg.name}" if fdp.package else msg.name))
    return classes
