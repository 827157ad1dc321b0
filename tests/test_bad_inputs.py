"""Bad inputs: each gets slimq's own error type with a message naming the problem, and leaves
every file as it was."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import slimq
from conftest import QUANT_CFG, files_in
from helpers import MixedNet, make_batches, train
from slimq.errors import (CheckpointError, ConfigError, ExportArgumentError, ExportError, ModelError, NumericalError,
                          RecordError, SlimqError)

X = torch.randn(2, 2, 8, 8)
PRUNE = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: %s ascend_optimized: false } } }\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A compressed MixedNet with its config, record and checkpoint, made once."""
    folder = tmp_path_factory.mktemp("base")
    cfg = folder / "q.cfg"
    cfg.write_text(QUANT_CFG)
    record = folder / "record.txt"
    torch.manual_seed(0)
    original = MixedNet()
    model = slimq.create_compressed_retrain_model(original, X, str(cfg), str(record))
    train(model, make_batches(2, (4, 2, 8, 8), 10))
    torch.save({"state_dict": model.state_dict()}, folder / "ckpt.pth")
    return SimpleNamespace(folder=folder, cfg=cfg, record=record, original=original, model=model)


def cfg_text(text):
    return lambda env: _write(env, "case.cfg", text)


def _write(env, name, text):
    p = env.tmp / name
    p.write_text(text)
    return str(p)


def create(env, config=None, model=None, inputs=X, record=None):
    return slimq.create_compressed_retrain_model(model if model is not None else MixedNet(), inputs,
                                                 config or str(env.base.cfg), record or str(env.tmp / "new_record.txt"))


def restore(env, record=None, pth=None, name="state_dict", model=None, config=None):
    return slimq.restore_compressed_retrain_model(model if model is not None else MixedNet(), X,
                                                  config or str(env.base.cfg), record or str(env.record),
                                                  pth or str(env.pth), name)


def save(env, save_path=None, model=None, **options):
    return slimq.save_compressed_retrain_model(model if model is not None else env.base.model, str(env.record),
                                               save_path or str(env.tmp / "m"), X, **options)


def _nan_training(env):
    model = create(env)
    env.before = env.snapshot()  # creating the model is setup; the bad input is what follows
    model.train()
    x = X.clone()
    x[0, 0, 0, 0] = float("nan")
    model(torch.randn(2, 2, 8, 8)).sum().backward()  # initialises the ranges
    model(x).sum().backward()  # the training step does not synchronise to check: it is deferred
    model.eval()
    model(X)  # the next eval forward reports it, before anything is written


def _corrupt_record(env):
    Path(env.record).write_text("record { key: 'conv' value { scale_d: 0.1 ")
    return restore(env)


def _other_model_record(env):
    cfg = _write(env, "prune.cfg", QUANT_CFG + PRUNE % 0.5)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.conv2(torch.relu(self.conv(x))).mean((2, 3)))

    rec = str(env.tmp / "other_record.txt")
    slimq.create_compressed_retrain_model(Other(), X, cfg, rec)
    for p in env.tmp.iterdir():  # only the case itself must leave files untouched
        env.before[p.name] = env.snapshot_one(p)
    return restore(env, record=rec, config=cfg)


class _Evil:
    """Unpickling this runs code: slimq must never do it on its own initiative."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_object_ckpt(env):
    marker = env.tmp / "code_ran.txt"
    p = env.tmp / "obj.pth"
    torch.save({"state_dict": env.base.model.state_dict(), "extra": _Evil(str(marker))}, p)
    env.before = env.snapshot()
    try:
        return restore(env, pth=str(p))
    finally:
        assert not marker.exists(), "the checkpoint's code ran"


def _not_a_torch_file(env):
    p = env.tmp / "junk.pth"
    p.write_bytes(b"this is not a checkpoint\n" * 10)
    env.before = env.snapshot()
    return restore(env, pth=str(p))


def _other_model_ckpt(env):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 8, 3, padding=1)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    other = slimq.create_compressed_retrain_model(Other(), X, str(env.base.cfg), str(env.tmp / "other.txt"))
    p = env.tmp / "other.pth"
    torch.save({"state_dict": other.state_dict()}, p)
    env.before = env.snapshot()
    return restore(env, pth=str(p))


def _prune_env(env, ratio=0.5):
    """A pruned model's config, record and checkpoint (setup, not the bad input)."""
    cfg = _write(env, "prune.cfg", QUANT_CFG + PRUNE % ratio)
    rec = str(env.tmp / "prune_record.txt")
    model = slimq.create_compressed_retrain_model(MixedNet(), X, cfg, rec)
    torch.save({"state_dict": model.state_dict()}, env.tmp / "prune.pth")
    return cfg, rec, str(env.tmp / "prune.pth")


def _record_other_ratio(env):
    cfg, rec, pth = _prune_env(env, 0.5)
    other = _write(env, "prune_low.cfg", QUANT_CFG + PRUNE % 0.25)
    env.before = env.snapshot()
    return restore(env, record=rec, pth=pth, config=other)


def _record_overwritten(env):
    cfg, rec, pth = _prune_env(env, 0.5)
    other = _write(env, "prune_low.cfg", QUANT_CFG + PRUNE % 0.25)
    slimq.create_compressed_retrain_model(MixedNet(), X, other, rec)  # another run writes the same record
    env.before = env.snapshot()
    return restore(env, record=rec, pth=pth, config=cfg)


def _empty_record_with_pruning(env):
    cfg, rec, pth = _prune_env(env)
    Path(rec).write_text("")
    env.before = env.snapshot()
    return restore(env, record=rec, pth=pth, config=cfg)


def _quant_record_with_prune_config(env):
    cfg, _, pth = _prune_env(env)
    env.before = env.snapshot()
    return restore(env, record=str(env.record), pth=pth, config=cfg)


def _prune_record_with_quant_config(env):
    _, rec, pth = _prune_env(env)
    env.before = env.snapshot()
    return restore(env, record=rec, pth=pth)


def _scripted_model(env):
    return create(env, model=torch.jit.script(MixedNet()))


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.dw(torch.relu(self.conv(x))).mean((2, 3)))


def _read_only_save(env):
    if os.geteuid() == 0:  # root writes through permissions: use a folder no one can write in
        return save(env, save_path="/sys/slimq_model")
    ro = env.tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env.before.update({})
    return save(env, save_path=str(ro / "m"))


CASES = [
    ("syntax error", cfg_text("batch_num: 1\nretrain_data_quant_config {\n"), create, ConfigError, r"case\.cfg:\d+"),
    ("unknown field", cfg_text("retrain_data_quant_config { ulq_quantize {} }\nfoo: 1\n"), create, ConfigError, r"case\.cfg:2.*foo"),
    ("wrong enum", cfg_text("retrain_data_quant_config { ulq_quantize { dst_type: INT3 } }\n"), create, ConfigError, "INT3"),
    ("prune_ratio 0", cfg_text(PRUNE % 0), create, ConfigError, "prune_ratio"),
    ("prune_ratio 1", cfg_text(PRUNE % 1), create, ConfigError, "prune_ratio"),
    ("prune_ratio negative", cfg_text(PRUNE % -0.5), create, ConfigError, "prune_ratio.*-0.5"),
    ("prune_ratio NaN", cfg_text(PRUNE % "nan"), create, ConfigError, "prune_ratio.*nan"),
    ("nothing configured", cfg_text("batch_num: 4\n"), create, ConfigError, "nothing to do"),
    ("filter and 2:4 on one layer group", cfg_text(QUANT_CFG + PRUNE % 0.5 + 'override_layer_configs { layer_name: "conv" prune_config { n_out_of_m_pruner { l1_selective_prune {} } } }\n'),
     lambda env, c: create(env, c, model=_ResidualPair()), ConfigError, "never both"),
    ("skip name matches nothing", cfg_text(QUANT_CFG + 'skip_layers: "convv"\n'), create, ConfigError, "no layer named 'convv'.*'conv'"),
    ("override name matches nothing", cfg_text(QUANT_CFG + 'override_layer_configs { layer_name: "nope" retrain_weight_quant_config { arq_retrain {} } }\n'), create, ConfigError, "nope"),
    ("skip type matches nothing", cfg_text(QUANT_CFG + 'skip_layer_types: "Conv3d"\n'), create, ConfigError, "type 'Conv3d'"),
    ("override type ineligible", cfg_text(QUANT_CFG + 'override_layer_types { layer_type: "BatchNorm2d" retrain_weight_quant_config { arq_retrain {} } }\n'), create, ConfigError, "BatchNorm2d.*not eligible"),
    ("missing config file", None, lambda env, _: create(env, str(env.tmp / "missing.cfg")), ConfigError, "missing.cfg.*does not exist"),
    ("record file missing", None, lambda env, _: restore(env, record=str(env.tmp / "none.txt")), RecordError, "none.txt.*does not exist"),
    ("record file corrupt", None, lambda env, _: _corrupt_record(env), RecordError, "corrupt"),
    ("record from another model", None, lambda env, _: _other_model_record(env), RecordError, "another model"),
    ("pth_file missing", None, lambda env, _: restore(env, pth=str(env.tmp / "no.pth")), CheckpointError, "no.pth.*does not exist"),
    ("pth_file wrong keys", None, lambda env, _: restore(env, pth=_float_ckpt(env), name=None), CheckpointError, "missing keys"),
    ("wrong state_dict_name", None, lambda env, _: restore(env, name="model"), CheckpointError, "no entry 'model'"),
    ("input_data not tensors", None, lambda env, _: create(env, inputs=("a", 3)), ModelError, "tuple of example input tensors"),
    ("input_data wrong shape", None, lambda env, _: create(env, inputs=torch.randn(2, 5, 8, 8)), ModelError, "forward pass failed.*input_data"),
    ("model not a Module", None, lambda env, _: create(env, model=lambda x: x), ModelError, "torch.nn.Module"),
    ("DataParallel model", None, lambda env, _: create(env, model=nn.DataParallel(MixedNet())), ModelError, "DataParallel"),
    ("save_path folder missing", None, lambda env, _: save(env, save_path=str(env.tmp / "no" / "m")), ExportError, "does not exist"),
    ("signed_weights not a bool", None, lambda env, _: save(env, signed_weights="int8"), ExportArgumentError, "signed_weights.*'int8'"),
    ("save_path folder read-only", None, lambda env, _: _read_only_save(env), ExportError, "not writable"),
    ("record_file folder missing", None, lambda env, _: create(env, record=str(env.tmp / "no" / "r.txt")), RecordError, "does not exist"),
    ("config is a folder", None, lambda env, _: create(env, str(env.tmp)), ConfigError, "is a folder"),
    ("pth_file holds Python objects", None, lambda env, _: _pickled_object_ckpt(env), CheckpointError, "weights_only=True.*re-save"),
    ("pth_file not a torch file", None, lambda env, _: _not_a_torch_file(env), CheckpointError, "junk.pth.*not a checkpoint|cannot be read"),
    ("pth_file of another model", None, lambda env, _: _other_model_ckpt(env), CheckpointError, "other.pth.*does not match"),
    ("record made with another prune ratio", None, lambda env, _: _record_other_ratio(env), RecordError, "prune_record.txt.*prune_low.cfg.*keeps"),
    ("record overwritten by another run", None, lambda env, _: _record_overwritten(env), RecordError, "prune_record.txt.*prune.cfg.*keeps"),
    ("empty record, pruning config", None, lambda env, _: _empty_record_with_pruning(env), RecordError, "holds no channel pruning"),
    ("quant-only record, pruning config", None, lambda env, _: _quant_record_with_prune_config(env), RecordError, "holds no channel pruning"),
    ("pruning record, quant-only config", None, lambda env, _: _prune_record_with_quant_config(env), RecordError, "configures no channel pruning"),
    ("input_data empty", None, lambda env, _: create(env, inputs=()), ModelError, "empty tuple"),
    ("TorchScript model", None, lambda env, _: _scripted_model(env), ModelError, "TorchScript"),
    ("2:4 by name on a depthwise conv", cfg_text(QUANT_CFG + 'override_layer_configs { layer_name: "dw" prune_config { n_out_of_m_pruner { l1_selective_prune {} } } }\n'),
     lambda env, c: create(env, c, model=_Depthwise()), ConfigError, r"case\.cfg:\d+.*'dw'.*depthwise"),
    ("NaN activations in training", None, lambda env, _: _nan_training(env), NumericalError, "NaN or Inf reached quantized layer '\\w+'.*input activations"),
]


class _ResidualPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.other = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head((self.conv(x) + self.other(x)).mean((2, 3)))


def _float_ckpt(env):
    p = env.tmp / "float.pth"
    torch.save(MixedNet().state_dict(), p)
    env.before = env.snapshot()
    return str(p)


@pytest.mark.parametrize("title,make_cfg,call,error,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, base, title, make_cfg, call, error, pattern):
    env = SimpleNamespace(tmp=tmp_path, base=base)
    shutil.copy(base.record, tmp_path / "record.txt")
    shutil.copy(base.folder / "ckpt.pth", tmp_path / "ckpt.pth")
    env.record, env.pth = str(tmp_path / "record.txt"), str(tmp_path / "ckpt.pth")
    config = make_cfg(env) if make_cfg else None
    env.snapshot = lambda: files_in(tmp_path)
    env.snapshot_one = lambda p: (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
    env.before = env.snapshot()
    with pytest.raises(error, match=pattern) as info:
        call(env, config)
    assert isinstance(info.value, SlimqError)
    after = env.snapshot()
    if title == "record file corrupt":  # the case wrote the corrupt file itself
        env.before["record.txt"] = after["record.txt"]
    assert after == env.before, f"files changed: {set(after.items()) ^ set(env.before.items())}"
