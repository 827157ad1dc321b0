"""Config fuzzing: generated and mutated configs end in success or a slimq error, nothing else.

CI runs a short campaign; set ``SLIMQ_FUZZ_EXAMPLES`` (per strategy) for a longer one, e.g.
``SLIMQ_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -s``.
"""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimq
from slimq.config import ConfigMessages
from slimq.errors import SlimqError
from test_config import AMCT_STYLE, ISSUE_SAMPLE
from test_sparsity import MIXED, Mixed

EXAMPLES = int(os.environ.get("SLIMQ_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MODEL = Mixed()
INPUT = torch.randn(2, 3, 8, 8)
NAMES = ["a.0", "a.1", "b.0", "c.0", "fc", "a", "", "fc.weight", "nope", "A.0", "b.0 "]
TYPES = ["Conv2d", "Linear", "BatchNorm2d", "ReLU", "Conv1d", "ConvTranspose2d", "_ConvNd", "Module", "x"]
COUNTS = {"schema": 0, "mutation": 0}

_FD = type(ConfigMessages["AMCTRetrainConfig"].DESCRIPTOR.fields[0])


def _scalar(draw, fd):
    t = fd.type
    if t == _FD.TYPE_BOOL:
        return draw(st.booleans())
    if t in (_FD.TYPE_FLOAT, _FD.TYPE_DOUBLE):
        return draw(st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 1.0, -0.0, 1e30, math.nan, math.inf])))
    if t in (_FD.TYPE_UINT32, _FD.TYPE_INT32, _FD.TYPE_INT64, _FD.TYPE_UINT64):
        return draw(st.one_of(st.integers(0, 5), st.integers(0, 2 ** 32 - 1)))
    if t == _FD.TYPE_ENUM:
        return draw(st.sampled_from([v.number for v in fd.enum_type.values]))
    pool = TYPES if "type" in fd.name else NAMES
    return draw(st.one_of(st.sampled_from(pool), st.text(max_size=6)))


def _fill(draw, msg, depth: int) -> None:
    for fd in msg.DESCRIPTOR.fields:
        if not draw(st.booleans()) or depth > 5:
            continue
        repeated = getattr(fd, "is_repeated", None)
        repeated = fd.label == fd.LABEL_REPEATED if repeated is None else repeated
        count = draw(st.integers(1, 3)) if repeated else 1
        for _ in range(count):
            if fd.message_type is not None:
                sub = getattr(msg, fd.name).add() if repeated else getattr(msg, fd.name)
                sub.SetInParent()
                _fill(draw, sub, depth + 1)
            elif repeated:
                getattr(msg, fd.name).append(_scalar(draw, fd))
            else:
                setattr(msg, fd.name, _scalar(draw, fd))


@st.composite
def schema_configs(draw):
    msg = ConfigMessages["AMCTRetrainConfig"]()
    _fill(draw, msg, 0)
    return text_format.MessageToString(msg)


SEEDS = [ISSUE_SAMPLE, AMCT_STYLE, MIXED]


@st.composite
def mutated_configs(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)).encode())
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup_line", "drop_line", "swap_lines"]))
        if op in ("flip", "insert", "delete") and data:
            i = draw(st.integers(0, len(data) - 1))
            if op == "flip":
                data[i] = draw(st.integers(0, 255))
            elif op == "insert":
                data.insert(i, draw(st.sampled_from(list(b"{}:;\"'[]<>#-.0123456789 \nINT8e"))))
            else:
                del data[i]
        else:
            lines = data.split(b"\n")
            i, j = (draw(st.integers(0, len(lines) - 1)) for _ in range(2))
            if op == "dup_line":
                lines.insert(j, lines[i])
            elif op == "drop_line":
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\n".join(lines))
    return bytes(data)


def _run(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz.cfg")
        with open(path, "wb") as f:
            f.write(raw)
        try:
            slimq.plan(MODEL, INPUT, path)
        except SlimqError:
            pass  # anything else propagates and fails the test


@FUZZ
@given(schema_configs())
def test_generated_configs_only_raise_slimq_errors(text):
    COUNTS["schema"] += 1
    _run(text.encode())


@FUZZ
@given(mutated_configs())
def test_mutated_sample_configs_only_raise_slimq_errors(raw):
    COUNTS["mutation"] += 1
    _run(raw)


@pytest.fixture(scope="module", autouse=True)
def _report_campaign_size():
    """Print how many configs the campaign ran (visible with -s); a report, not a test."""
    yield
    print(f"\nconfig fuzzing: {COUNTS['schema']} generated + {COUNTS['mutation']} mutated configs "
          f"(SLIMQ_FUZZ_EXAMPLES={EXAMPLES})")
