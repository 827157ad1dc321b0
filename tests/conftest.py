"""Shared fixtures: config files, deterministic data, small models."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")

QUANT_CFG = """
batch_num: 1
retrain_data_quant_config: { ulq_quantize: { dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT8 } }
"""


@pytest.fixture
def write_cfg(tmp_path: Path):
    """write_cfg(text, name='c.cfg') -> path of a config file holding ``text``."""
    def _write(text: str, name: str = "c.cfg") -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)
    return _write


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def files_in(folder: Path) -> dict:
    """{name: (size, mtime_ns)} of every file below ``folder`` (to prove nothing was written)."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out
