"""Export inputs: several positional tensors, keyword tensors at the end of ``input_data``, Python
scalar defaults (never graph inputs); ``input_names`` name exactly the tensor inputs, and ONNX
Runtime is fed exactly those."""
from __future__ import annotations

import onnx
import onnxruntime as ort
import torch
from torch import nn

import slimq
from conftest import QUANT_CFG
from helpers import rel_l2


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Linear(4, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, img, aux, scale=1.0, mask=None):
        y = torch.relu(self.conv(img)).mean((2, 3)) * scale + self.aux(aux)
        if mask is not None:
            y = y * mask
        return self.head(y)


def _run(path: str, feeds):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(feeds)  # exactly the tensor inputs
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def test_positional_keyword_and_scalar_inputs(tmp_path, write_cfg):
    torch.manual_seed(0)
    img, aux, mask = torch.randn(2, 3, 8, 8), torch.randn(2, 4), (torch.rand(2, 8) > 0.3).float()
    data = (img, aux, {"scale": 2.0, "mask": mask})
    record = str(tmp_path / "r.txt")
    cm = slimq.create_compressed_retrain_model(TwoInputs().eval(), data, write_cfg(QUANT_CFG), record)
    cm.train()
    cm(*data[:2], **data[2]).sum().backward()
    cm.eval()
    with torch.no_grad():
        expected = cm(img, aux, scale=2.0, mask=mask)
    saved = slimq.save_compressed_retrain_model(cm, record, str(tmp_path / "m"), data,
                                                input_names=["image", "features"])
    for path in (saved.fake_quant_path, saved.deploy_path):
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == ["image", "features", "mask"]
    fq = _run(saved.fake_quant_path, {"image": img, "features": aux, "mask": mask})
    assert rel_l2(fq, expected.numpy()) <= 1e-5  # the scalar 2.0 is baked in, not an input
    dep = _run(saved.deploy_path, {"image": img, "features": aux, "mask": mask})
    assert rel_l2(dep, fq) <= 2e-2
    assert saved.fake_quant_vs_torch <= 1e-5
