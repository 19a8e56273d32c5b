"""Export a trained model for deployment: ONNX, TorchScript or a ``torch.export`` program (pt2).

    python -m kmnist_torch.export RUN --format onnx --out kmnist.onnx

The exported model takes float32 N x C x H x W images (white ink on black, in [0, 1]) for any
batch size N and returns N x K logits; the classes and the rest of ``model.pt``'s metadata
travel with it (ONNX metadata_props, a ``meta.json`` extra file in TorchScript and pt2). After
writing, the exported model is run on a real batch of the run's test images (random images
where those cannot be loaded) of another batch size than the one traced, and its outputs are
compared with the eager model's; the largest difference is printed and must be at most
:data:`TOLERANCE` (ONNX is run with onnxruntime).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import nn

from ._args import Parser, add_data_options, run_main
from ._io import atomic_write, failed_write, write_error
from .data.splits import load_run_split
from .errors import DataFilesError, ExportError, FormatError, UserError
from .models.modelfile import find_model_file, load_model

__all__ = ["FORMATS", "TOLERANCE", "Format", "build_parser", "export", "main", "run"]

TOLERANCE = 1e-4
ONNX_TOOLS = ("onnx", "onnxscript", "onnxruntime")
CHECK_BATCH = 64


class Logits(nn.Module):
    """The model's plain ``forward(x) -> logits``, without the mixup arguments, to export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _meta_json(meta: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in meta.items() if k != "file"}, ensure_ascii=False)


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=1 << 16)


def _write_onnx(net: nn.Module, example: torch.Tensor, out: BinaryIO, meta: dict) -> None:
    import onnx

    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: _batch_dim()}},
        verbose=False,
    )
    proto = program.model_proto
    for key, value in (("kmnist_torch", _meta_json(meta)), ("classes", "".join(meta["classes"]))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, out)


def _load_onnx(out: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.cpu().numpy()})[0])

    return run


def _write_torchscript(net: nn.Module, example: torch.Tensor, out: BinaryIO, meta: dict) -> None:
    # Asked for by name; torch's deprecation notice (pt2 is its successor) is in the --help.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, out, _extra_files={"meta.json": _meta_json(meta)})


def _load_torchscript(out: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(out), map_location="cpu")


def _write_pt2(net: nn.Module, example: torch.Tensor, out: BinaryIO, meta: dict) -> None:
    program = torch.export.export(net, (example,), dynamic_shapes={"x": {0: _batch_dim()}})
    torch.export.save(program, out, extra_files={"meta.json": _meta_json(meta)})


def _load_pt2(out: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.export.load(str(out)).module()


@dataclass(frozen=True)
class Format:
    """One export format: its title, the file names it is written under, how to write it, how to
    load the written file back to check it, and the modules it needs beyond torch."""

    title: str
    suffixes: tuple[str, ...]
    write: Callable[[nn.Module, torch.Tensor, BinaryIO, dict], None]  # into memory
    load: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]
    help: str
    needs: tuple[str, ...] = ()  # modules beyond torch (installed by the export extra)


# name -> format: the one table of export formats (torch.export.save insists on .pt2).
FORMATS: dict[str, Format] = {
    "onnx": Format(
        "ONNX", (".onnx",), _write_onnx, _load_onnx, "needs the export extra", ONNX_TOOLS
    ),
    "torchscript": Format(
        "TorchScript",
        (".pt", ".ts", ".pth"),
        _write_torchscript,
        _load_torchscript,
        "deprecated by torch",
    ),
    "pt2": Format(
        "pt2", (".pt2",), _write_pt2, _load_pt2, "torch.export, load with torch.export.load"
    ),
}


def export(model: nn.Module, fmt: str, out: str | Path, batch: torch.Tensor) -> float:
    """Export ``model`` (from :func:`kmnist_torch.load_model`, on the CPU) to ``out`` with a
    dynamic batch size, then run the exported file on ``batch`` and compare with the model.

    Args:
        model: the model, with its ``.meta``.
        fmt: a name in :data:`FORMATS`.
        out: the file to write (through a temporary beside it, renamed once checked).
        batch: float32 N x C x H x W images to check on (N > 2: the export is traced with 2,
            so the check also shows the batch size is dynamic).

    Returns:
        The largest absolute difference between the exported and the eager logits.

    Raises:
        ExportError: the tools are missing, or the difference is over :data:`TOLERANCE`.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    form = FORMATS[fmt]
    missing = [m for m in form.needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"{form.title} export needs {', '.join(missing)}: pip install "
            f"'kmnist-torch[export]' (or pip install {' '.join(form.needs)})"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside ``out`` and renamed once checked: a failed check, an error or a signal
    # (Ctrl-C, SIGTERM) on the way leaves no file at ``out``, so a rerun is not refused.
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    net = Logits(model.cpu().eval()).eval()
    try:
        with torch.no_grad():
            _write(form, net, batch[:2].clone(), tmp, out, model.meta)
            exported = form.load(tmp)
            want = net(batch)
            got = exported(batch)
        diff = (got.float() - want.float()).abs().max().item()
        if not diff <= TOLERANCE:
            raise ExportError(
                f"{out}: the exported model differs from the eager one by up to {diff:.2e} "
                f"(more than {TOLERANCE:g}); nothing written"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def _write(form: Format, net: nn.Module, example: torch.Tensor, tmp: Path, out: Path, meta: dict):
    """The export made in memory, then written to ``tmp`` through ``_io.atomic_write``: torch's
    own file writers abort the process on a full disk (``unexpected pos``); a failed write here
    is one error naming ``out``."""
    buffer = io.BytesIO()
    form.write(net, example, buffer, meta)
    try:
        atomic_write(tmp, buffer.getbuffer())
    except UserError as exc:
        cause = failed_write(exc)
        if cause is None:
            raise
        # The same WriteError (exit 74), naming the file the user asked for, not its temporary.
        raise write_error(out, cause) from exc
    except OSError as exc:
        raise ExportError(
            f"{out}: writing the {form.title} file failed ({exc.strerror or exc}); nothing was "
            "written there: free some space and run the same command again"
        ) from exc


def _check_batch(model_file: Path, meta: dict, root: str | None, verify: bool) -> tuple:
    """Up to :data:`CHECK_BATCH` of the run's test images, or random ones where they cannot
    be loaded; and where they came from."""
    try:
        split, _ = load_run_split(model_file, meta, "test", root, verify, download=False)
        data = split.data[:CHECK_BATCH]
        if data.dim() == 3:
            data = data.unsqueeze(1)
        return data.float().div(255.0), f"{len(data)} test images"
    except (DataFilesError, FormatError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"note: the run's test images cannot be loaded ({first})", file=sys.stderr)
        generator = torch.Generator().manual_seed(0)
        c, size = meta["channels"], meta["image_size"]
        x = torch.rand(16, c, size, size, generator=generator)
        return x, "16 random images"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = Parser(
        prog="python -m kmnist_torch.export",
        description="Export a trained model (dynamic batch size) and check it against eager.",
    )
    p.add_argument("run", metavar="RUN", help="run folder, model.pt or checkpoint.pt")
    p.add_argument(
        "--format",
        choices=list(FORMATS),
        required=True,
        help="; ".join(f"{name} ({f.help})" for name, f in FORMATS.items()),
    )
    p.add_argument("--out", required=True, metavar="FILE")
    add_data_options(
        p,
        root_help="data folder of the check batch (default: the run's)",
        download=None,
        device_help=None,
    )
    return p


def _out_problem(out: Path, fmt: str) -> str | None:
    """Why ``--out`` cannot take the export, or None: checked before any work is done."""
    suffixes = FORMATS[fmt].suffixes
    if out.suffix.lower() not in suffixes:
        return f"--out {out}: a {fmt} file ends in {' or '.join(suffixes)}"
    if out.is_dir():
        return f"--out {out} is a folder; name the file to write"
    if out.exists():
        return f"--out {out} exists; remove it first or name another file (nothing overwritten)"
    if not out.parent.is_dir():
        return f"--out {out}: the folder {out.parent} does not exist"
    return None


def run(argv: list[str] | None = None) -> float:
    """Parse ``argv``, export and check; returns the largest difference from eager."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _out_problem(Path(args.out), args.format)
    if problem:
        parser.error(problem)
    model_file = find_model_file(args.run)
    model = load_model(model_file, "cpu")
    batch, source = _check_batch(model_file, model.meta, args.root, args.verify)
    diff = export(model, args.format, args.out, batch)
    print(
        f"wrote {args.out} ({args.format}, batch size dynamic); max abs difference from the "
        f"eager model on {source}: {diff:.2e} (tolerance {TOLERANCE:g})"
    )
    return diff


def main(argv: list[str] | None = None) -> int:
    """The command line: export and check (see :func:`run`); errors as one line."""
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
