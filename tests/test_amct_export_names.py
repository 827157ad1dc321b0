"""input_names / output_names / dynamic_axes are checked before any export.

Ports ``test_selective_prune.py::test_check_param_onnx_export`` (hicann/amct), whose cases AMCT
rejects with "dynamic_axes key must be str", "value must be dict or list", "container element
type error", "type must be dict" and "value is invalid" (negative axes); slimq rejects the same
values with an :class:`ExportArgumentError` (a ``ValueError`` and ``TypeError``) saying which
entry is wrong, plus what AMCT lets through to ``torch.onnx.export``: axes beyond the rank,
more names than tensors, repeated names, keys naming no input or output.
"""
from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
import torch

import amct_models as M
import slimq
from conftest import files_in
from slimq.errors import ExportArgumentError, ExportError
from slimq.export.inputs import check_export_names

X = (torch.randn(2, 3, 16, 16),)

CASES = [
    # AMCT's own cases
    (dict(dynamic_axes={1: 1}), r"dynamic_axes keys must be input/output names \(str\), got 1 \(int\)"),
    (dict(dynamic_axes={"1": (1, 1)}), None),  # a tuple of axes is a list of axes: accepted
    (dict(dynamic_axes={"1": ["1"]}), r"dynamic_axes\['1'\]: axes must be int, got '1' \(str\)"),
    (dict(dynamic_axes={"1": {"1": "1"}}), r"dynamic_axes\['1'\]: axis keys must be int, got '1' \(str\)"),
    (dict(dynamic_axes={"1": {1: 1}}), r"dynamic_axes\['1'\]\[1\]: the axis name must be a non-empty string, "
                                       r"got 1 \(int\)"),
    (dict(dynamic_axes=(1, 1)), r"dynamic_axes must be a dict .* got tuple"),
    (dict(dynamic_axes={"inputs": [-4, -3]}), r"dynamic_axes\['inputs'\]: axis -4 is negative"),
    (dict(dynamic_axes={"inputs": {-1: "1"}}), r"dynamic_axes\['inputs'\]: axis -1 is negative"),
    # beyond AMCT's checks
    (dict(dynamic_axes={"inputs": 0}), r"dynamic_axes\['inputs'\] must be a dict \{axis: name\} or a list of "
                                       r"axes, got int"),
    (dict(dynamic_axes={"inputs": [True]}), r"axes must be int, got True \(bool\)"),
    (dict(input_names=["x"], dynamic_axes={"x": [0, 4]}), r"dynamic_axes\['x'\]: axis 4 is beyond the tensor's "
                                                          r"rank 4 \(axes 0\.\.3\)"),
    (dict(input_names=["x"], output_names=["y"], dynamic_axes={"z": [0]}), r"dynamic_axes key 'z' names no "
                                                                           r"input or output"),
    (dict(input_names=["x", "y"]), r"input_names has 2 names but input_data holds 1 tensor\(s\)"),
    (dict(input_names="x"), r"input_names must be a list of strings, got str"),
    (dict(input_names=[3]), r"input_names\[0\] must be a non-empty string, got 3 \(int\)"),
    (dict(output_names=["y", "y"]), r"output_names names 'y' twice"),
    (dict(input_names=["x"], output_names=["x"]), r"'x' is both an input and an output name"),
    (dict(output_names=["a", "b"], n_outputs=1), r"output_names has 2 names but the model returns 1 tensor"),
    (dict(output_names=["y"], output_ranks=[2], dynamic_axes={"y": {2: "n"}}), r"axis 2 is beyond the tensor's "
                                                                               r"rank 2"),
]


@pytest.mark.parametrize("kwargs,pattern", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_check_export_names(kwargs, pattern):
    if pattern is None:
        check_export_names(X, **kwargs)
        return
    with pytest.raises(ExportArgumentError) as info:
        check_export_names(X, **kwargs)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    assert isinstance(info.value, ExportError) and isinstance(info.value, slimq.SlimqError)


def test_valid_names_pass():
    check_export_names(X, None, None, None)
    check_export_names(X, ["x"], ["y"], {"x": {0: "batch", 2: "h", 3: "w"}, "y": [0]}, n_outputs=1)
    check_export_names((torch.randn(2, 3), 5, torch.randn(4)), ["a", "b"], None, {"b": [0]})  # 2 tensors


def _quantized_model(tmp_path):
    x = torch.randn(2, 2, 28, 28)
    record = str(tmp_path / "record.txt")
    config = str(tmp_path / "config.json")
    slimq.create_quant_retrain_config(config, M.Net001(), x)
    model = slimq.create_quant_retrain_model(config, M.Net001(), record, x)
    return model, x, record, config


def test_save_entry_points_check_before_writing(tmp_path):
    model, x, record, config = _quantized_model(tmp_path)
    before = files_in(tmp_path)
    with pytest.raises(ExportArgumentError, match="axis -1 is negative"):
        slimq.save_quant_retrain_model(config, model, record, str(tmp_path / "q"), x, dynamic_axes={"in": [-1]})
    assert files_in(tmp_path) == before
    pruned = slimq.create_prune_retrain_model(M.Net001(), x, str(Path(__file__).parent / "amct_fixtures" /
                                                                 "configs" / "filter_prune_05.cfg"),
                                              str(tmp_path / "prune_record.txt"))
    before = files_in(tmp_path)
    with pytest.raises(ExportArgumentError, match="input_names has 2 names"):
        slimq.save_prune_retrain_model(pruned, str(tmp_path / "p"), x, input_names=["a", "b"])
    assert files_in(tmp_path) == before


def test_names_and_dynamic_axes_reach_the_onnx_files(tmp_path):
    pruned = slimq.create_prune_retrain_model(M.Net001(), torch.randn(2, 2, 28, 28),
                                              str(Path(__file__).parent / "amct_fixtures" / "configs" /
                                                  "filter_prune_05.cfg"), str(tmp_path / "record.txt"))
    report = slimq.save_prune_retrain_model(pruned, str(tmp_path / "p"), torch.randn(2, 2, 28, 28),
                                            input_names=["images"], output_names=["logits"],
                                            dynamic_axes={"images": {0: "batch"}, "logits": [0]})
    for path in (report.deploy_path, report.fake_quant_path):
        graph = onnx.load(path).graph
        assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
