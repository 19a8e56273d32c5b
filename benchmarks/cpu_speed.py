"""Ours against what a user would pick instead, on this CPU, in one run: every row of
docs/benchmarks.md, with the float32 and bf16 matrix-product rates measured in the same run.

Rows: exact 4-NN against scikit-learn (KMNIST size, K49 size on a slice of its test images),
simple-CNN training steps against a plain torchvision-style loop, PreActResNet-18 + manifold
mixup steps against the reference loop, whole simple-CNN recipe runs against the plain loop
(images/s and top-1 on held-out images, benchmarks/_accuracy.py; one pair per seed), and
inference (eager against onnxruntime). Ours and the peer alternate, best of ``--repeats``
(the 4-NN rows: ``--knn-repeats``, default the same); the load average is recorded beside each
row, because the machine may be shared. Writes JSON (--out) and the docs page (--docs).

    python benchmarks/cpu_speed.py                       # everything (tens of minutes)
    python benchmarks/cpu_speed.py --quick               # small sizes: the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import _accuracy
import _shared
import numpy as np
import torch
import train_throughput as tt
from torch.utils.data import DataLoader

from kmnist_torch.data import formats
from kmnist_torch.models import knn_pca
from kmnist_torch.models.knn import knn_predict
from kmnist_torch.models.registry import create_model
from kmnist_torch.training import cpu
from kmnist_torch.training.recipes import RECIPES

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> dict[str, Any]:
    """The CPU, its flags of interest, torch, and the load when the run started."""
    name = platform.processor() or platform.machine()
    for line in cpu.CPUINFO.read_text().splitlines() if cpu.CPUINFO.exists() else []:
        if line.startswith("model name"):
            name = line.partition(":")[2].strip()
            break
    flags = cpu.cpu_flags()
    return {
        "cpu": name,
        "cpus": os.cpu_count(),
        "flags": [f for f in FLAGS if f in flags],
        "bf16_units": cpu.bf16_units(flags),
        # Whether our training steps sum weight gradients as chunked matrix products
        # (kmnist_torch.training.cpu_conv): the policy each of our fresh processes applies.
        "gemm_wgrad": cpu.gemm_wgrad_enabled(torch.device("cpu"), flags),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "load_at_start": os.getloadavg(),
    }


def gemm_rates(repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of a 1,000 x 784 by 784 x 8,000 product in float32 and in bf16 (best of N)."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randint(-128, 128, (1000, 784)).to(dtype)
        b = torch.randint(-128, 128, (8000, 784)).to(dtype)
        a @ b.T
        best = min(_timed(lambda a=a, b=b: a @ b.T)[0] for _ in range(repeats))
        out[name] = 2 * 1000 * 8000 * 784 / best / 1e9
    return out


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def _interleaved(
    ours: Callable, peer: Callable, repeats: int, threads: dict[str, int] | None = None
) -> dict[str, Any]:
    """Best seconds of each, alternating, with the load average before each try. With
    ``threads``, the package's thread policy decides ``threads["ours"]`` before each of ours'
    tries, outside the timing (its sample of /proc/stat is a command's start-up cost)."""
    best = {"ours": float("inf"), "peer": float("inf")}
    results, loads = {}, []
    for _ in range(repeats):
        for key, fn in (("ours", ours), ("peer", peer)):
            if key == "ours" and threads is not None:
                threads["ours"] = cpu.choose_threads()
            loads.append(os.getloadavg()[0])
            seconds, results[key] = _timed(fn)
            best[key] = min(best[key], seconds)
    return {"ours_s": best["ours"], "peer_s": best["peer"], "loads": loads, **results}


def shifted_images(n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Real strokes at KMNIST/K49 sizes: each image a copy of a real KMNIST test image moved
    by up to 3 px; training images from the first 5,000 real images, test images from the
    other 5,000 (never a moved copy of a training image). Random strokes without ../shared."""
    rng = np.random.default_rng(seed)
    real = _shared.real_kmnist_test_npz()
    if real is not None:
        base = formats.read_npz(real[0], (-1, 28, 28))
        labels = formats.read_npz(real[1], (-1,))
    else:
        base = np.where(rng.random((10000, 28, 28)) < 0.2, rng.integers(0, 256, (10000, 28, 28)), 0)
        base, labels = base.astype(np.uint8), rng.integers(0, 10, 10000)
    padded = np.pad(base, ((0, 0), (3, 3), (3, 3)))

    def draw(lo: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        # Distinct (image, shift) pairs: no two images are the same copy.
        pick = rng.choice(5000 * 49, n, replace=False)
        idx, shift = lo + pick // 49, pick % 49
        dy, dx = shift // 7, shift % 7
        rows = (dy[:, None] + np.arange(28))[:, :, None]
        cols = (dx[:, None] + np.arange(28))[:, None, :]
        return padded[idx[:, None, None], rows, cols], labels[idx]

    return (*draw(0, n_train), *draw(5000, n_test))


# Whole simple-CNN runs: one epoch of 8,000 images took 23.0 s (ours, 1 thread) and 17.9 s (the
# plain loop) at load 1.3 on the 2-core development machine (before the thread policy read
# /proc/stat), so the default 2 epochs x 2 seeds
# is about 3 min; the recipe's 12 epochs would be about 16 min there.
ACC_EPOCHS = 2

SCREENS = {"default": None, "on": True, "off": False}


def knn_row(
    n_train: int,
    n_test: int,
    repeats: int,
    rates: dict[str, float],
    screen: str = "default",
    plain_scan: bool = False,
) -> dict[str, Any]:
    """Exact 4-NN: knn_predict (``screen``: its default, or the projection screen forced on
    or off) against KNeighborsClassifier(4, "distance", n_jobs=-1); with ``plain_scan``, the
    plain scan (``screen=False``) timed once as well."""
    torch_default = torch.get_num_threads()
    from sklearn.neighbors import KNeighborsClassifier

    train, labels, test, truth = shifted_images(n_train, n_test)
    flat_train, flat_test = train.reshape(n_train, -1), test.reshape(n_test, -1)

    def peer() -> np.ndarray:
        clf = KNeighborsClassifier(n_neighbors=4, weights="distance", n_jobs=-1)
        return clf.fit(flat_train, labels).predict(flat_test)

    chosen: dict[str, int] = {}

    def ours() -> np.ndarray:
        # The threads the package's policy chose (cpu.choose_threads, as the trainer's).
        default = torch.get_num_threads()
        torch.set_num_threads(chosen["ours"])
        try:
            return knn_predict(train, labels, test, screen=SCREENS[screen]).numpy()
        finally:
            torch.set_num_threads(default)

    res = _interleaved(ours, peer, repeats, chosen)
    res["ours_threads"] = chosen["ours"]
    flops = 2.0 * n_train * n_test * 784
    ours, theirs = res.pop("ours"), res.pop("peer")
    plain: dict[str, Any] = {}
    if plain_scan:
        # The plain scan (one float32 product per test batch) once, for the screen's gain, on
        # the threads the policy chooses (not cpu.configure: its malloc setting would carry
        # over to the plain training loops, which run in this process).
        torch.set_num_threads(cpu.choose_threads(None))
        plain["plain_load"] = os.getloadavg()[0]
        plain["plain_s"], scanned = _timed(
            lambda: knn_predict(train, labels, test, screen=False).numpy()
        )
        plain["plain_mismatches"] = int((scanned != theirs).sum())
        torch.set_num_threads(torch_default)
    return {
        **res,
        **plain,
        "train": n_train,
        "test": n_test,
        "screen": screen,
        "screen_dims": knn_pca.DIMS,
        "screen_lanes": knn_pca.LANES,
        "mismatches": int((ours != theirs).sum()),
        "accuracy": float((ours == truth).mean()),
        "floor_float32_s": flops / (rates["float32"] * 1e9),
        "floor_bf16_s": flops / (rates["bf16"] * 1e9),
    }


def _plain_cnn_loop(data, targets, batch: int, steps: int, workers: int) -> float:
    """Images/s of what a user writes: a torchvision-style dataset (PIL + ToTensor), a
    DataLoader with workers, the simple CNN written plainly (``_accuracy.PlainCNN``), Adam,
    cross-entropy; torch's default threads and memory format."""
    from torchvision import transforms

    ds = tt.PILDataset(data, targets, transforms.ToTensor())
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    torch.manual_seed(0)
    model = _accuracy.plain_cnn()
    opt = torch.optim.Adam(model.parameters())
    batches = tt._cycle(loader)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def _our_steps(model_name: str, data, targets, batch: int, steps: int) -> tuple[float, int]:
    """Images/s of the trainer's own step on device-resident batches, and the threads it ran
    on: threads, memory format and malloc chosen by kmnist_torch.training.cpu."""
    default = torch.get_num_threads()
    cpu.configure("auto", None)
    mixup = "manifold" if model_name == "preact18" else "none"
    args = argparse.Namespace(
        model=model_name, batch_size=batch, mixup=mixup, steps=steps, warmup=1,
        alpha=2.0 if mixup == "manifold" else 0.0,
    )  # fmt: skip
    split = type("Split", (), {"data": data, "targets": targets})()
    loader = tt.TensorLoader(split, batch, shuffle=True, device="cpu", drop_last=True, seed=0)
    torch.manual_seed(0)
    model = cpu.prepare_model(
        create_model(model_name, 10, in_chans=1), torch.device("cpu"), training=True
    )
    try:
        res = tt.measure(tt._cycle(loader), loader, model, model, torch.device("cpu"), args, True)
        return res["images_per_second"], torch.get_num_threads()
    finally:
        torch.set_num_threads(default)


def _peer_steps(model_name: str, data, targets, batch: int, steps: int) -> tuple[float, int]:
    """Images/s of the plain loop (simple CNN) or the reference loop (PreActResNet-18: PIL +
    RandomCrop, DataLoader with 2 workers, torch's default memory format), and its threads
    (torch's default: all the CPUs)."""
    if model_name == "simple_cnn":
        return _plain_cnn_loop(data, targets, batch, steps, workers=2), torch.get_num_threads()
    args = argparse.Namespace(
        model="preact18", batch_size=batch, mixup="manifold", alpha=2.0, steps=steps, warmup=1
    )
    ref = tt.DataLoader(
        tt.PILDataset(data, targets, _crop()), batch_size=batch, shuffle=True,
        drop_last=True, num_workers=2, persistent_workers=True,
    )  # fmt: skip
    torch.manual_seed(0)
    m = create_model("preact18", 10, in_chans=1)
    res = tt.measure(tt._cycle(ref), ref, m, m, torch.device("cpu"), args, False)
    return res["images_per_second"], torch.get_num_threads()


def step_flops(model_name: str) -> float:
    """Floating-point operations of one training step, per image: torch's FLOP counter over the
    forward and backward pass at batch 2 (the convolutions and matrix products; the rest, a
    few percent, is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = create_model(model_name, 10, in_chans=1)
    x = torch.rand(2, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long))
        loss.backward()
    return counter.get_total_flops() / 2


def _here(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def train_row(
    model_name: str, batch: int, steps: int, repeats: int, isolate: bool = False
) -> dict[str, Any]:
    """Training images/s: ours (threads from the package's policy) against the reference or
    plain loop (torch's default threads: all the CPUs). ``isolate``: ours in a fresh process
    (``_shared.fresh_process``), as the script runs it: the package's malloc setting is
    process-wide, and the peer, which runs here as a user's own script would, must not
    inherit it. (The peer stays in this process: its DataLoader workers ran 30% slower
    inside a spawned child than in a script's own process, 334-363 against 494-504 img/s.)"""
    run = {"ours": _shared.fresh_process if isolate else _here, "peer": _here}
    data, targets, _ = tt.load_images(4000)
    best = {"ours": 0.0, "peer": 0.0}
    loads: list[float] = []
    threads: dict[str, int | None] = {"ours": None, "peer": None}
    for _ in range(repeats):
        for side, fn in (("ours", _our_steps), ("peer", _peer_steps)):
            loads.append(os.getloadavg()[0])
            rate, threads[side] = run[side](fn, model_name, data, targets, batch, steps)
            best[side] = max(best[side], rate)
    return {
        "ours_img_s": best["ours"],
        "peer_img_s": best["peer"],
        "ours_threads": threads["ours"],
        "peer_threads": threads["peer"],
        "batch": batch,
        "steps": steps,
        "loads": loads,
        "isolated": isolate,
        "peer_malloc_tuned": bool(cpu.POLICY.malloc_tuned),
        "flops_per_image": step_flops(model_name),
    }


def accuracy_row(
    epochs: int | None,
    repeats: int,
    n_train: int = 8000,
    n_test: int = 2000,
    data=None,
    isolate: bool = False,
) -> dict[str, Any]:
    """Whole runs of the simple CNN recipe (``RECIPES["cnn"]``; ``epochs`` cuts its epochs):
    ours (the trainer's engine on device-resident batches, its thread policy) against the
    plain loop (PIL dataset + DataLoader, 2 workers, torch's default threads), the same
    ``n_train`` images and initial weights; top-1 on the same ``n_test`` held-out images.
    One pair per seed (0 .. repeats - 1), ours first; images/s best of the seeds, accuracy
    their mean, ``equal`` when the mean difference is inside ``band`` (two binomial standard
    errors of the difference on ``n_test`` images). ``data``: an ``_accuracy.Split`` to use
    instead of the fixed split of the real images. ``isolate``: ours in a fresh process, as
    in :func:`train_row`."""
    recipe = RECIPES["cnn"] if epochs is None else RECIPES["cnn"].override(epochs=epochs)
    data = _accuracy.split(n_train, n_test) if data is None else data
    run = _shared.fresh_process if isolate else _here
    runs = []
    for seed in range(repeats):
        runs.append({"ours": run(_accuracy.ours, recipe, data, seed)})
        runs[-1]["peer"] = _accuracy.plain(recipe, data, seed, 2)
    mean = {k: sum(r[k]["accuracy"] for r in runs) / len(runs) for k in ("ours", "peer")}
    best = {k: max(r[k]["img_s"] for r in runs) for k in ("ours", "peer")}
    band = _accuracy.band(mean["ours"], mean["peer"], len(data.test_y))
    diff = mean["ours"] - mean["peer"]
    return {
        "recipe": "cnn",
        "epochs": recipe.epochs,
        "recipe_epochs": RECIPES["cnn"].epochs,
        "batch": recipe.batch_size,
        "optimizer": recipe.optimizer,
        "lr": recipe.lr,
        "train": len(data.train_y),
        "test": len(data.test_y),
        "source": data.source,
        "runs": runs,
        "ours_img_s": best["ours"],
        "peer_img_s": best["peer"],
        "ratio": best["ours"] / best["peer"],
        "ours_accuracy": mean["ours"],
        "peer_accuracy": mean["peer"],
        "accuracy_diff": diff,
        "band": band,
        "equal": abs(diff) <= band,
        "peer_malloc_tuned": bool(cpu.POLICY.malloc_tuned),
        "loads": [r[k]["load"] for r in runs for k in ("ours", "peer")],
    }


def _crop():
    from torchvision import transforms

    return transforms.Compose([transforms.RandomCrop(28, padding=2), transforms.ToTensor()])


def inference_row(images: int, repeats: int) -> dict[str, Any]:
    """Images/s of the simple CNN, eager (kmnist_torch.training.cpu.inference, in the batches
    and memory format evaluate and predict feed on a CPU) against the same model exported to
    ONNX and run by onnxruntime, at the better for it of that batch and 1,000."""
    import onnxruntime

    torch.manual_seed(0)
    model = create_model("simple_cnn", 10, in_chans=1).eval()
    x = torch.rand(images, 1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cnn.onnx"
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.onnx.export(
            model, (x[:2],), dynamo=True, input_names=["images"], dynamic_shapes={"x": {0: batch}}
        )
        program.save(str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    dev = torch.device("cpu")
    step = cpu.eval_batch(dev, 1000)  # what evaluate and predict feed
    cpu.prepare_model(model, dev)  # and the memory format they use

    chosen: dict[str, int] = {}

    def eager() -> torch.Tensor:
        default = torch.get_num_threads()
        torch.set_num_threads(chosen["ours"])  # the threads evaluate and predict would use
        try:
            with cpu.inference(dev):
                return torch.cat([model(cpu.prepare_batch(x[i : i + step], dev))
                                  for i in range(0, images, step)])  # fmt: skip
        finally:
            torch.set_num_threads(default)

    def ort(batch: int) -> torch.Tensor:
        parts = [session.run(None, {"images": x[i : i + batch].numpy()})[0]
                 for i in range(0, images, batch)]  # fmt: skip
        return torch.from_numpy(np.concatenate(parts))

    # onnxruntime at its better batch here: the eager path's, or 1,000.
    peer_batch = min((step, 1000), key=lambda b: _timed(lambda: ort(b))[0])

    def onnx() -> torch.Tensor:
        return ort(peer_batch)

    res = _interleaved(eager, onnx, repeats, chosen)
    diff = float((res.pop("ours") - res.pop("peer")).abs().max())
    return {
        **res,
        "images": images,
        "max_abs_diff": diff,
        "threads": chosen["ours"],
        "ours_batch": step,
        "peer_batch": peer_batch,
    }


def table(res: dict[str, Any]) -> list[str]:
    """The markdown table of every row."""
    rates = res["gemm_gflops"]
    lines = [
        "| work | ours | what a user would pick | ratio | load (1 min) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, knn in res["knn"].items():
        lines.append(
            f"| exact 4-NN, {key} ({knn['train']:,} / {knn['test']:,}); float32 product alone "
            f"{knn['floor_float32_s']:.1f} s, bf16 {knn['floor_bf16_s']:.1f} s | "
            f"{knn['ours_s']:.1f} s{_screen(knn)}{_plain(knn)} | "
            f"scikit-learn {knn['peer_s']:.1f} s | "
            f"{knn['peer_s'] / knn['ours_s']:.2f}x, {knn['mismatches']} predictions differ | "
            f"{_loads(knn)} |"
        )
    names = {"simple_cnn": "simple CNN training steps", "preact18": "PreActResNet-18 + manifold "
             "mixup training steps"}  # fmt: skip
    peers = {
        "simple_cnn": "plain loop, PIL dataset + DataLoader (2 workers)",
        "preact18": "the reference loop (PIL + RandomCrop, DataLoader, 2 workers)",
    }
    for key, row in res["train"].items():
        lines.append(
            f"| {names[key]}, batch {row['batch']} | {row['ours_img_s']:.1f} img/s "
            f"({_threads(row['ours_threads'])}{_flop_rate(row, 'ours')}) | {peers[key]}: "
            f"{row['peer_img_s']:.1f} img/s ({row['peer_threads']} threads"
            f"{_flop_rate(row, 'peer')}) | {row['ours_img_s'] / row['peer_img_s']:.2f}x | "
            f"{_loads(row)} |"
        )
    if "accuracy" in res:
        lines.append(_accuracy_line(res["accuracy"]))
    inf = res["inference"]
    lines.append(
        f"| simple CNN inference, {inf['images']:,} images, eager | "
        f"{inf['images'] / inf['ours_s']:,.0f} img/s{_batch(inf, 'ours')} | onnxruntime on the "
        f"exported model: {inf['images'] / inf['peer_s']:,.0f} img/s{_batch(inf, 'peer')} | "
        f"{inf['peer_s'] / inf['ours_s']:.2f}x | "
        f"{_loads(inf)} |"
    )
    lines.append(
        f"| matrix product 1,000 x 784 x 8,000 | float32 {rates['float32']:.1f} GFLOP/s | "
        f"bf16 {rates['bf16']:.1f} GFLOP/s | {rates['float32'] / rates['bf16']:.2f}x | |"
    )
    return lines


def _accuracy_line(acc: dict[str, Any]) -> str:
    """The table row of whole simple-CNN runs: images/s, seconds and top-1 of each side."""

    def side(key: str) -> str:
        runs = [r[key] for r in acc["runs"]]
        best = max(runs, key=lambda r: r["img_s"])
        each = ", ".join(f"{100 * r['accuracy']:.1f}%" for r in runs)
        seeds = ", ".join(str(r["seed"]) for r in runs)
        spread = f" (seeds {seeds}: {each})" if len(runs) > 1 else ""
        return (
            f"{best['img_s']:.1f} img/s ({_threads(best['threads'])}, "
            f"{best['train_s']:.1f} s), top-1 {100 * acc[key + '_accuracy']:.1f}%{spread}"
        )

    verdict = "inside" if acc["equal"] else "outside"
    return (
        f"| simple CNN recipe, whole runs: {acc['epochs']} of its {acc['recipe_epochs']} epochs "
        f"on {acc['train']:,} images, batch {acc['batch']}, top-1 on {acc['test']:,} others | "
        f"{side('ours')} | plain loop, PIL dataset + DataLoader (2 workers): {side('peer')} | "
        f"{acc['ratio']:.2f}x; top-1 {round(100 * acc['accuracy_diff'], 1) + 0.0:+.1f} points, "
        f"{verdict} "
        f"+/-{100 * acc['band']:.1f} | {_loads(acc)} |"
    )


def _accuracy_note(res: dict[str, Any]) -> str:
    """The page's words on the accuracy row: its data, epochs, seeds and the noise rule."""
    acc = res.get("accuracy")
    if acc is None:
        return "The accuracy of whole runs was not measured in this run."
    cut = (
        f"{acc['epochs']} of the recipe's {acc['recipe_epochs']} epochs (`--acc-epochs`: all "
        f"{acc['recipe_epochs']} take {acc['recipe_epochs'] / acc['epochs']:.0f} times as long)"
        if acc["epochs"] != acc["recipe_epochs"]
        else f"all {acc['epochs']} of the recipe's epochs"
    )
    return (
        f"The whole-runs row trains the `cnn` recipe ({acc['optimizer']} lr {acc['lr']:g}, "
        f"batch {acc['batch']}) for "
        f"{cut} on {acc['train']:,} {acc['source']} and scores top-1 on {acc['test']:,} others "
        "(one fixed split, the same images for both sides, checked by a digest of what each "
        "side was handed). Ours is the trainer's engine (`train_one_epoch`) on device-resident "
        "batches with the thread policy `train` applies; the plain loop is a PIL dataset + "
        "`DataLoader(num_workers=2)` + `torch.optim.Adadelta`, cross-entropy, torch's default "
        "threads; both drop the last partial batch, so both take the same steps. "
        f"{_seeds_note(acc)} "
        "Rule for equal accuracy: the difference is inside two binomial standard errors of "
        f"a difference of two accuracies on {acc['test']:,} images, "
        "2 sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n), the +/- beside it. That band covers the "
        "test sample only, not the spread between training runs (other shuffles and dropout "
        f"draws), which can be larger{_spread_note(acc)}"
    )


def _seeds_note(acc: dict[str, Any]) -> str:
    """How the row's seeds were used: one, or several (best images/s, mean top-1)."""
    seeds = len(acc["runs"])
    if seeds == 1:
        return (
            "One seed (0), both sides from the same initial weights; images/s over the "
            "training epochs only (no evaluation inside)."
        )
    return (
        f"{seeds} seeds, each giving both sides the same initial weights; images/s is the "
        "best seed, over the training epochs only (no evaluation inside), and top-1 is the "
        "mean over seeds."
    )


def _spread_note(acc: dict[str, Any]) -> str:
    if len(acc["runs"]) == 1:
        return ": with one seed this run does not measure it (`--repeats 3` would)."
    return ": the per-seed figures show it."


def _screen(knn: dict[str, Any]) -> str:
    """How the 4-NN ran, where a run forced the projection screen on or off."""
    return {"on": " (`screen=True`)", "off": " (`screen=False`)"}.get(knn.get("screen", ""), "")


def _plain(knn: dict[str, Any]) -> str:
    """The plain scan's time beside the default's, where the run measured it."""
    if "plain_s" not in knn:
        return ""
    return f" (plain scan {knn['plain_s']:.1f} s, {knn['plain_mismatches']} differ)"


def _wrapped(text: str) -> str:
    """``text`` (empty or not) as more lines of the bullet above it."""
    text = text.strip()
    if not text:
        return ""
    return "\n" + _bullet_text(text)


def _bullet_text(text: str) -> str:
    """``text`` wrapped and indented as the lines of a bullet on the page."""
    return textwrap.fill(text, 94, initial_indent="  ", subsequent_indent="  ")


def _flop_rate(row: dict[str, Any], side: str) -> str:
    """``; N GFLOP/s``: the training step's counted FLOPs at that side's images/s (runs from
    before this was recorded: nothing)."""
    if "flops_per_image" not in row:
        return ""
    return f"; {row['flops_per_image'] * row[side + '_img_s'] / 1e9:.0f} GFLOP/s"


def _needed(res: dict[str, Any]) -> str:
    """What 1.5x the alternative's images/s would ask of each training row, in FLOP/s, beside
    the float32 matrix product measured in the same run."""
    rate = res["gemm_gflops"]["float32"]
    parts = []
    for key, row in res.get("train", {}).items():
        if "flops_per_image" in row:
            need = 1.5 * row["peer_img_s"] * row["flops_per_image"] / 1e9
            parts.append(
                f"{key} {row['flops_per_image'] / 1e6:,.1f} MFLOP an image, so 1.5x the "
                f"alternative would sustain {need:.0f} GFLOP/s over the whole step "
                f"({need / rate:.2f}x the float32 matrix product of the last row)"
            )
    if not parts:
        return ""
    return (
        "The GFLOP/s beside the images/s count the convolutions and matrix products of a "
        "training step (torch's FLOP counter): " + "; ".join(parts) + "."
    )


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _batch(row: dict[str, Any], side: str) -> str:
    """The batch a side ran, where the run recorded it."""
    return f" (batches of {row[side + '_batch']:,})" if side + "_batch" in row else ""


def _loads(row: dict[str, Any]) -> str:
    return f"{min(row['loads']):.1f}-{max(row['loads']):.1f}"


PAGE = """# Benchmarks on the CPU

Generated by `{command}` (it rewrites this page; `--from-json` rewrites it from a run's
JSON without measuring again). Ours beside what a
user would pick instead, measured in one run on one machine; ours and the alternative
alternate, best of {repeats}{knn_repeats}. The load average (1 minute, before each try; it
counts the benchmark's own work too) is given beside each row: figures from a machine loaded
by other work are lower and noisier than from an idle one, for both sides alike.

Machine: {cpu}, {cpus} CPUs; flags {flags}; bf16 units: {units}; torch {torch}; our
convolutions' weight gradients: {wgrad}.

{table}

- **4-NN**: `knn_predict` against scikit-learn's `KNeighborsClassifier(4, weights="distance",
  n_jobs=-1)`, fit and predict, the same images; the predictions are compared one by one.
  The real KMNIST training images were not available where this ran, so the images are real
  KMNIST test images moved by up to 3 px (training images from 5,000 of them, test images
  from the other 5,000). {k49_note} Beside the time: the float32 and bf16 matrix products
  alone at the rates measured in the same run (the last row). On this CPU, which has no bf16
  units, bf16 is emulated and {bf16_ratio:.1f}x slower than float32, so the 4-NN's exact
  distances stay float32 products. At these sizes `knn_predict` on a CPU screens by default
  with `kmnist_torch.models.knn_pca` (a provable lower bound from {dims} principal directions
  and the residual norm, then exact distances for the images it cannot rule out; {lanes};
  `--knn-screen off` measures the plain scan); the ours cell says where a run forced it on or
  off.
- **Threads**: ours runs with the intra-op threads `kmnist_torch.training.cpu` chooses, as
  `train`, `evaluate` and `predict` do: the CPUs other processes leave free (their CPU time
  over a short sample of `/proc/stat`, this process's own not counted), at least 1; the
  4-NN's screen runs no more batches at once than that. The alternatives use their defaults
  (all the CPUs). On a machine busy with other work that choice gives us a lead; on an idle
  one both sides use every CPU, and the rows show what is left: the data path, the memory
  format and the allocator.
- **Training**: images/s of training steps (no evaluation), each model on its recipe's
  batch (PreActResNet-18 + manifold mixup: the `paper` recipe's 100; runs before 2026-12-02
  used 32), on the real KMNIST test images. Ours runs the trainer's step on device-resident
  batches, each batch moved by up to 2 px (for the simple CNN too, which the plain loop does
  not do), with what `kmnist_torch.training.cpu` chooses on a CPU: its threads, the
  channels_last memory format for the model and its batches, glibc's malloc told to keep
  freed memory for the next step, and where the CPU has AVX2 but not AVX-512 the weight
  gradients of its convolutions as chunked matrix products (`kmnist_torch.training.cpu_conv`;
  the machine line says which ran). The alternatives use torch's defaults and a plainly
  written model (the simple CNN as `_accuracy.PlainCNN`: `nn.Dropout`, ReLU before max
  pooling, the same initial weights).
  Each of our training runs starts in a fresh Python process; theirs run in the script's own
  process, which never applies the package's CPU settings, so they keep glibc's allocator
  as a user's script finds it (`peer_malloc_tuned` in the JSON says so).{needed_note}
{accuracy_note}
- **Inference**: the simple CNN (random weights) on random images, eager under
  `kmnist_torch.training.cpu.inference` in the batches `evaluate` and `predict` feed on a CPU
  (`kmnist_torch.training.cpu.eval_batch`), against onnxruntime on the ONNX export at the
  better for it of that batch and 1,000.
"""


def write_page(res: dict[str, Any], path: Path) -> None:
    m = res["machine"]
    k49 = res["knn"].get("K49 size")
    first = next(iter(res["knn"].values()), {})
    note = (
        (
            "The K49-size row scores all of K49's 38,547 test images."
            if k49["test"] >= 38547
            else f"The K49-size row scores {k49['test']:,} of K49's 38,547 test images (both "
            "sides' time grows in proportion to the test images)."
        )
        if k49
        else ""
    )
    path.write_text(
        PAGE.format(
            command=res["command"],
            repeats=res["repeats"],
            knn_repeats=(
                f" (the 4-NN rows: best of {res['knn_repeats']})"
                if res.get("knn_repeats", res["repeats"]) != res["repeats"]
                else ""
            ),
            cpu=m["cpu"],
            cpus=m["cpus"],
            flags=", ".join(m["flags"]),
            units=", ".join(m["bf16_units"]) or "none",
            wgrad=_wgrad(m.get("gemm_wgrad")),
            torch=m["torch"],
            table="\n".join(table(res)),
            k49_note=note,
            # Runs from before these were recorded: 160 directions, one batch at a time.
            dims=first.get("screen_dims", 160),
            lanes=_lanes(first.get("screen_lanes", 1)),
            needed_note=_wrapped(_needed(res)),
            accuracy_note=_bullet_text(_accuracy_note(res)),
            bf16_ratio=res["gemm_gflops"]["float32"] / res["gemm_gflops"]["bf16"],
        ),  # fmt: skip
        encoding="utf-8",
    )


def _wgrad(gemm: bool | None) -> str:
    """How our training steps summed weight gradients (None: a run from before this was
    recorded, when oneDNN always did)."""
    if gemm:
        return "chunked matrix products (`kmnist_torch.training.cpu_conv`)"
    return "oneDNN's"


def _lanes(n: int) -> str:
    """How many batches of test images the screen works on at once, in words."""
    if n == 1:
        return "one batch of test images at a time"
    words = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
    count = words[n - 2] if 2 <= n < len(words) + 2 else f"{n:,}"
    return f"{count} batches of test images at a time, each in a thread of its own"


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="best of N, interleaved (default 2)")
    p.add_argument(
        "--knn-repeats",
        type=_at_least_one,
        default=None,
        help="best of N for the 4-NN rows alone (default: --repeats); the whole-run rows are "
        "the long ones",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: check the plumbing")
    p.add_argument("--k49-test", type=int, default=2000, help="K49-size test images (2000)")
    p.add_argument(
        "--knn-screen",
        choices=sorted(SCREENS),
        default="default",
        help="the 4-NN's projection screen: knn_predict's default, or forced on or off",
    )
    p.add_argument(
        "--acc-epochs",
        type=_at_least_one,
        default=ACC_EPOCHS,
        help=f"epochs of the whole simple-CNN runs (default {ACC_EPOCHS}; the recipe's: 12)",
    )
    p.add_argument("--out", default="bench-out/cpu_speed.json")
    p.add_argument("--docs", default=None, help="write the docs page here (docs/benchmarks.md)")
    p.add_argument("--from-json", default=None, help="only write --docs from this run's JSON")
    args = p.parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        print("\n".join(table(res)))
        write_page(res, Path(args.docs or "docs/benchmarks.md"))
        return 0
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/cpu_speed.py", *given])
    res: dict[str, Any] = {"machine": machine(), "repeats": args.repeats, "command": command}
    res["knn_repeats"] = args.knn_repeats or args.repeats
    print(json.dumps(res["machine"]))
    res["gemm_gflops"] = gemm_rates()
    print("GEMM GFLOP/s", res["gemm_gflops"])
    sizes = {"KMNIST size": (60000, 10000), "K49 size": (232365, args.k49_test)}
    if args.quick:
        sizes = {"KMNIST size": (3000, 300)}
    res["knn"] = {}
    for name, (n_train, n_test) in sizes.items():
        res["knn"][name] = knn_row(
            n_train, n_test, res["knn_repeats"], res["gemm_gflops"], args.knn_screen,
            plain_scan=n_train * n_test <= 60000 * 10000,
        )  # fmt: skip
        print(name, res["knn"][name])
    # Timed steps: about 6 s of ours for the simple CNN (20 steps, 2 s, read 1.37x and 1.73x
    # in two runs an hour apart on the shared machine) and 9 s for PreActResNet-18.
    cnn_steps, preact_steps = (3, 2) if args.quick else (60, 5)
    res["train"] = {
        "simple_cnn": train_row("simple_cnn", 128, cnn_steps, args.repeats, isolate=True),
        "preact18": train_row("preact18", 100, preact_steps, args.repeats, isolate=True),
    }
    print(res["train"])
    acc = (1, 500, 500) if args.quick else (args.acc_epochs, 8000, 2000)
    res["accuracy"] = accuracy_row(acc[0], args.repeats, acc[1], acc[2], isolate=True)
    print(_accuracy_line(res["accuracy"]))
    res["inference"] = inference_row(2000 if args.quick else 10000, args.repeats)
    res["load_at_end"] = os.getloadavg()
    print("\n".join(table(res)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    if args.docs:
        write_page(res, Path(args.docs))
    return 1 if any(k["mismatches"] for k in res["knn"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
