"""ONNX Runtime CPU latency and file size of slimq's deploy models against the FP32 export and
ONNX Runtime's own quantizer, side by side in one run.

    python benchmarks/bench_deploy.py [--models resnet18,resnet50,mobilenet_v2] [--size 224]
                                      [--runs 30] [--threads 2]

Per model (torchvision, random init), five files, all timed alternately at batch 1 in one process
with the same session settings (median of --runs):

* FP32: ``torch.onnx.export`` of the float model, and of the 30% channel-pruned float model (what
  pruning alone buys; the pruned INT8 files cannot beat it by more than INT8 does);
* ORT quantize_static: ``quant_pre_process`` then ``quantize_static`` of the FP32 file (QDQ,
  uint8 activations, per-channel int8 weights, calibrated on the same random inputs);
* slimq INT8: the deploy model of INT8 QAT alone, with the default weight storage (int8 where
  this CPU has VNNI/AMX, see ``slimq.export.cpu``) and with ``signed_weights=False`` (uint8
  weights, zero point 128: exact on every CPU);
* slimq 30% + INT8: the same for 30% channel pruning (``ascend_optimized``) + INT8 QAT;
* slimq qoperator: the qoperator target of the INT8-alone model (integer operators written
  directly, see ``slimq.export.targets.qoperator``), default storage.

The compressed models are created and briefly retrained on random data (accuracy is not the point
here: benchmarks/bench_accuracy.py measures it). The CPU model, its ISA flags and the load
average are printed, because the INT8 ratios depend on the CPU (VNNI, AMX) and on what else runs.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

import slimq
from slimq.cli.demo import alternating_latencies
from slimq.export.cpu import int8_weights_default

QUANT = """batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
"""
PRUNE = QUANT + "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: true } } }\n"
MODELS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50,
          "mobilenet_v2": torchvision.models.mobilenet_v2}
HERE = "s8" if int8_weights_default()[0] else "u8"
FP32, FP32_PRUNED, ORTQ = "FP32 (torch.onnx export)", "FP32, 30% pruned", "ORT quantize_static (QDQ)"
INT8, INT8_U8 = f"slimq INT8 (default: {HERE} weights)", "slimq INT8 (signed_weights=False: u8)"
PRUNED, PRUNED_U8 = f"slimq 30% + INT8 (default: {HERE})", "slimq 30% + INT8 (u8)"
QOP = f"slimq INT8, qoperator target ({HERE})"


def cpu_info() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = sorted(set(re.findall(r"\b(avx2|avx512\w*|avx_vnni\w*|amx\w*)\b", text)))
    return f"{name.group(1) if name else 'unknown CPU'}; {os.cpu_count()} logical CPUs; ISA: {' '.join(flags) or '-'}"


def session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # all sessions live in one process and run alternately: idle spinning threads of one would
    # steal the cores of the other, so none spins (same settings for all)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class _Calibration(CalibrationDataReader):
    def __init__(self, name: str, batches: List[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_quantize(fp32: Path, out: Path, calib: List[np.ndarray]) -> None:
    pre = out.with_name("pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    name = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    quantize_static(str(pre), str(out), _Calibration(name, calib), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def slimq_files(model: torch.nn.Module, cfg_text: str, x: torch.Tensor, folder: Path, tag: str,
                targets=()) -> Dict[str, str]:
    """{target: path} of the default save and ``u8``: the deploy model with uint8 weights."""
    cfg, record = folder / f"{tag}.cfg", folder / f"{tag}_record.txt"
    cfg.write_text(cfg_text)
    compressed = slimq.create_compressed_retrain_model(model, (x,), str(cfg), str(record))
    opt = torch.optim.SGD(compressed.parameters(), lr=1e-3)
    compressed.train()
    for _ in range(2):  # initialise ranges and take a step, like a (very) short retraining
        loss = compressed(torch.randn(2, *x.shape[1:])).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    compressed.eval()
    report = slimq.save_compressed_retrain_model(compressed, str(record), str(folder / tag), (x,),
                                                 targets=list(targets))
    unsigned = slimq.save_compressed_retrain_model(compressed, str(record), str(folder / f"{tag}_u8"), (x,),
                                                   signed_weights=False)
    return {**{t: r.path for t, r in report.targets.items()}, "u8": unsigned.deploy_path}


def export_fp32(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False)
    path.write_bytes(buf.getvalue())


def pruned_fp32(model: torch.nn.Module, x: torch.Tensor, folder: Path) -> Path:
    """The FP32 export of the model channel-pruned like the 30% + INT8 files (no quantization)."""
    cfg = folder / "prune.cfg"
    cfg.write_text(PRUNE.replace(QUANT, ""))
    pruned = slimq.create_prune_retrain_model(model, (x,), str(cfg), str(folder / "prune_record.txt")).eval()
    export_fp32(pruned, x, folder / "fp32_pruned.onnx")
    return folder / "fp32_pruned.onnx"


def build(name: str, size: int, folder: Path) -> Dict[str, str]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, size, size)
    fp32 = folder / "fp32.onnx"
    export_fp32(model, x, fp32)
    ort_quantize(fp32, folder / "ortq.onnx", [torch.randn(1, 3, size, size).numpy() for _ in range(8)])
    int8 = slimq_files(model, QUANT, x, folder, "int8", targets=["qoperator"])
    pruned = slimq_files(model, PRUNE, x, folder, "pruned")
    return {FP32: str(fp32), FP32_PRUNED: str(pruned_fp32(model, x, folder)), ORTQ: str(folder / "ortq.onnx"),
            INT8: int8["deploy"], INT8_U8: int8["u8"], PRUNED: pruned["deploy"], PRUNED_U8: pruned["u8"],
            QOP: int8["qoperator"]}


def file_bytes(path: str) -> int:
    data = Path(path + ".data")
    return os.path.getsize(path) + (data.stat().st_size if data.exists() else 0)


def time_all(files: Dict[str, str], size: int, runs: int, threads: int) -> Dict[str, float]:
    """Median ms per file at batch 1, all sessions alternating."""
    sessions = {k: session(p, threads) for k, p in files.items()}
    feed = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    return alternating_latencies(sessions, feed, runs, warmup=5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"CPU: {cpu_info()}")
    print(f"ONNX Runtime {ort.__version__}, torch {torch.__version__}, batch 1, 1x3x{args.size}x{args.size}, "
          f"{args.threads} threads, median of {args.runs} alternating runs")
    print(f"default INT8 weight storage here: {int8_weights_default()[1]}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print("| model | variant | ms | x FP32 | x ORT quantize_static | MB | x FP32 size |", flush=True)
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            files = build(name, args.size, Path(tmp))
            med = time_all(files, args.size, args.runs, args.threads)
            sizes = {k: file_bytes(p) for k, p in files.items()}
        for k in files:
            print(f"| {name} | {k} | {med[k]:.2f} | {med[k] / med[FP32]:.3f} | {med[k] / med[ORTQ]:.3f} | "
                  f"{sizes[k] / 1e6:.2f} | {sizes[k] / sizes[FP32]:.3f} |", flush=True)
    print()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
