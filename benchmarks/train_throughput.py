"""Training images/s of PreActResNet-18 (+ manifold mixup): a reference-style loop against ours,
same model, same device, same run.

- reference: a torchvision-style dataset (one PIL image per item, ``RandomCrop(28, padding=2)``
  for the up-to-2-px translation, ``ToTensor``), a ``DataLoader``, float32 throughout;
- ours: the split held on the device by ``TensorLoader``, translation on the device for the
  whole batch (``kmnist_torch.training.augment``), bf16 autocast and channels_last on CUDA,
  channels_last on a CPU (``kmnist_torch.training.cpu``), ``--compile`` optional.

Both time the trainer's own step, ``kmnist_torch.training.engine.train_step`` (SGD
Nesterov, mixup by ``kmnist_torch.training.mixup``); only the data path and the speed-ups
differ. Images: the real KMNIST test split from ../shared when present, else random ones.
Prints a table and the ratio; writes JSON (--out).

    python benchmarks/train_throughput.py                          # CUDA defaults
    python benchmarks/train_throughput.py --device cpu --batch-size 32 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import _shared
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from kmnist_torch import TensorLoader
from kmnist_torch.data import formats
from kmnist_torch.models.registry import create_model
from kmnist_torch.training import cpu, mixup
from kmnist_torch.training.engine import Job, RunState, train_step
from kmnist_torch.training.recipes import RECIPES
from kmnist_torch.training.runtime import device_name, sync

NUM_CLASSES = 10


class PILDataset(Dataset):
    """What torchvision's MNIST does per item: a PIL image of mode "L", then the transform."""

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, transform: Any) -> None:
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.data[i].numpy(), mode="L")
        return self.transform(img), int(self.targets[i])


def load_images(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(uint8 N x 28 x 28, int64 N, description): real KMNIST test images when available."""
    real = _shared.real_kmnist_test_npz()
    if real is not None:
        x = formats.read_npz(real[0], (-1, 28, 28))[:n]
        y = formats.read_npz(real[1], (-1,))[:n]
        source = f"real KMNIST test images ({len(x)})"
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, NUM_CLASSES, n)
        source = f"random images ({n}; ../shared absent)"
    return torch.from_numpy(np.array(x)), torch.from_numpy(np.asarray(y, dtype=np.int64)), source


def _cycle(loader: Any) -> Iterator:
    """Batches forever, a new pass (and shuffle) whenever one ends."""
    while True:
        yield from loader


def measure(
    batches: Iterator,
    loader: Any,
    model: torch.nn.Module,
    forward: Any,
    device: torch.device,
    args: argparse.Namespace,
    fast: bool,
) -> dict[str, float]:
    """Run ``args.warmup`` untimed then ``args.steps`` timed steps of the trainer's
    ``train_step``; images/s. ``fast``: translation on the device (the reference translates
    per item in its transform), bf16 + channels_last on CUDA, and channels_last on a CPU
    (kmnist_torch.training.cpu); the reference keeps torch's default memory format."""
    cuda = device.type == "cuda"
    recipe = RECIPES["paper"].override(
        model=args.model,
        batch_size=args.batch_size,
        lr=0.05,
        schedule="constant",
        milestones=(),
        mixup=args.mixup,
        alpha=args.alpha,
        translate=2 if fast else 0,
        amp=fast and cuda,
        channels_last=fast and cuda,
    )
    job = Job(recipe, model, loader, None, device, NUM_CLASSES, forward=forward)
    state = RunState(job, seed=0)
    model.train()
    t0 = 0.0
    layout = cpu.POLICY.channels_last
    cpu.POLICY.channels_last = layout if fast else "off"  # the reference: torch's default
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                t0 = sync(device)
            x, y = next(batches)
            loss = train_step(
                job, state, x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            )
        seconds = sync(device) - t0
    finally:
        cpu.POLICY.channels_last = layout
    return {
        "seconds": seconds,
        "steps": args.steps,
        "images": args.steps * args.batch_size,
        "images_per_second": args.steps * args.batch_size / seconds,
        "final_loss": loss.item(),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure both loops; print a table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=None, help="default 512 (CUDA), 32 (CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 / 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10 / 1)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="reference DataLoader workers (default: min(4, CPUs))",
    )
    p.add_argument("--mixup", default="manifold", choices=list(mixup.MODES))
    p.add_argument("--alpha", type=float, default=None, help="default: 2.0 manifold, 1.0 input")
    p.add_argument("--model", default="preact18")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--images", type=int, default=10000, help="size of the training set")
    p.add_argument("--out", default="bench-out/train_throughput.json")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (512 if cuda else 32)
    args.steps = args.steps or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    if args.alpha is None:
        args.alpha = mixup.DEFAULT_ALPHA.get(args.mixup, 0.0)
    if cuda:
        torch.backends.cudnn.benchmark = True

    data, targets, source = load_images(args.images)

    # Reference: per-item PIL + transforms, DataLoader, float32.
    tf = transforms.Compose([transforms.RandomCrop(28, padding=2), transforms.ToTensor()])
    ref_loader = DataLoader(
        PILDataset(data, targets, tf),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=cuda,
        persistent_workers=args.workers > 0,
    )
    torch.manual_seed(0)
    ref_model = create_model(args.model, NUM_CLASSES, in_chans=1).to(device)
    reference = measure(_cycle(ref_loader), ref_loader, ref_model, ref_model, device, args, False)
    del ref_model, ref_loader  # free the device and the workers before our loop

    # Ours: device-resident uint8 split, batch-wide augmentation on the device, bf16 +
    # channels_last on CUDA, channels_last on a CPU.
    loader = TensorLoader(
        type("Split", (), {"data": data, "targets": targets})(),
        args.batch_size,
        shuffle=True,
        device=device,
        drop_last=True,
        seed=0,
    )
    torch.manual_seed(0)
    model = create_model(args.model, NUM_CLASSES, in_chans=1).to(device)
    model = cpu.prepare_model(model, device, recipe_flag=cuda, training=True)
    forward = torch.compile(model) if args.compile else model
    ours = measure(_cycle(loader), loader, model, forward, device, args, True)

    ratio = ours["images_per_second"] / reference["images_per_second"]
    name = device_name(device)
    result = {
        "source": source,
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "mixup": args.mixup,
        "alpha": args.alpha,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "reference_workers": args.workers,
        "ours_bf16_channels_last": cuda,
        "ours_channels_last": cpu.channels_last_enabled(device, cuda),
        "ours_compile": args.compile,
        "reference": reference,
        "ours": ours,
        "ratio": ratio,
    }
    print(
        f"{args.model} + {args.mixup} mixup, batch {args.batch_size}, {args.steps} timed steps "
        f"after {args.warmup}, on {name}; {source}"
    )
    print(f"| {'loop':<80} | {'images/s':>9} |")
    print(f"| {'-' * 80} | {'-' * 8}: |")
    ref_name = f"reference: PIL + RandomCrop + ToTensor, DataLoader({args.workers} workers), fp32"
    ours_name = (
        "ours: TensorLoader + device translate"
        + (", bf16, channels_last" if cuda else ", fp32, channels_last (bf16: CUDA only)")
        + (", compile" if args.compile else "")
    )
    for label, res in ((ref_name, reference), (ours_name, ours)):
        print(f"| {label:<80} | {res['images_per_second']:>9,.1f} |")
    print(f"ratio ours / reference: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
