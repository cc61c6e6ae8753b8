"""``gloronet predict``: your own files -> the predicted class and its certified radius, per input.

Inputs are read as they are, never converted silently:

* images Pillow reads (PNG, JPEG, ...; extra ``images``): 8-bit grayscale or RGB, exactly the
  model's height and width (**no resizing**: a certificate is about the pixels the model sees).
  A colour image is refused by a grayscale model unless its three channels are equal, a grayscale
  one by a colour model, transparent pixels always;
* ``.npy`` arrays and every array of a ``.npz``: one input ``(C, H, W)`` (``(H, W)`` for one
  channel) or a batch ``(N, C, H, W)`` (``(N, H, W)``); channels first;
* folders: every such file in them (sorted; not recursive).

Values: uint8 pixels ``p`` become ``lo + (hi − lo)·p/255`` in the model's input range
``[lo, hi]`` (``net.input_range``; ``p/255`` for every model gloronet trains), exactly as training
scaled them. Float arrays must already lie in that range (0..255 floats, NaN or Inf are refused
with one line). Each input is certified by :meth:`gloronet.GloroNet.certify` (sound for the
floating-point forward pass, radius rounded down; certified at ε iff ``radius > ε``), or by its
top-k / affinity relaxation (:mod:`gloronet.relaxed`).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from . import data
from .config import read_yaml
from .gloro import GloroNet
from .runs import load_model, locate_run, read_model_meta, shape_text, write_text

INPUT_SUFFIXES = data.IMAGE_EXTENSIONS | {".npy", ".npz"}
OUTPUT_SUFFIXES = (".json", ".csv")
Chunk = tuple[list[str], torch.Tensor]  # names and inputs (N, C, H, W) in the model's range


def open_model(arg: str | Path, device: str | torch.device = "cpu") -> tuple[GloroNet, str, list[str], dict]:
    """``(net in eval mode, its name, class names, its config.yaml or {})`` of a run directory or a
    shipped model; the class names come from the dataset the run records (else the labels)."""
    path, shipped = locate_run(arg)
    net = load_model(path, map_location=device)
    cfg = read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else None
    cfg = cfg if isinstance(cfg, dict) else {}
    dataset = cfg.get("dataset") or read_model_meta(path).get("dataset")
    info = data.dataset_info(dataset) if dataset else None
    names = [info.class_name(c) if info else str(c) for c in range(net.num_classes)]
    return net, shipped or str(path), names, cfg


def expand(paths: list[str | Path]) -> list[Path]:
    """The input files named by ``paths`` (folders expanded; unknown types refused)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in INPUT_SUFFIXES)
            if not found:
                raise ValueError(f"{p}: no images (PNG, JPEG, ...), .npy or .npz files in this folder")
            files += found
        elif not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        elif p.suffix.lower() not in INPUT_SUFFIXES:
            raise ValueError(f"{p}: unsupported file type {p.suffix or '(no suffix)'}: give images (PNG, JPEG, ...), "
                             ".npy or .npz arrays")
        else:
            files.append(p)
    if not files:
        raise ValueError("no input files given")
    return files


def _expects(shape: tuple[int, int, int]) -> str:
    kind = "grayscale" if shape[0] == 1 else "RGB" if shape[0] == 3 else f"{shape[0]}-channel"
    return f"{shape_text(shape)} ({kind}, {shape[2]}×{shape[1]} pixels)"


def read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """An image file as uint8 ``(1, C, H, W)``, refused unless it already fits ``shape``."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading images needs Pillow: pip install 'gloronet[images]'") from None
    c, h, w = shape
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ValueError(f"{path} holds {im.n_frames} frames; give one image per file")
            im = im.convert("RGBA") if im.mode == "P" else im.convert("L") if im.mode == "1" else im
            mode, size, pixels = im.mode, im.size, np.asarray(im)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read the image ({' '.join(str(e).split())})") from None
    if mode not in ("L", "LA", "RGB", "RGBA"):
        raise ValueError(f"{path} has {mode} pixels; gloronet reads 8-bit grayscale or RGB images")
    if size != (w, h):
        raise ValueError(f"{path} is {size[0]}×{size[1]} pixels; the model takes {_expects(shape)}. gloronet never "
                         "resizes (a certificate holds for the pixels the model sees): resize or crop it yourself")
    pixels = pixels.reshape(h, w, -1)
    if mode in ("LA", "RGBA"):
        if (pixels[..., -1] != 255).any():
            raise ValueError(f"{path} has transparent pixels: flatten it onto a background first")
        pixels = pixels[..., :-1]
    if pixels.shape[-1] == 3 and c == 1:
        if not ((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])).all():
            raise ValueError(f"{path} is a colour image; the model takes {_expects(shape)}: convert it to grayscale first")
        pixels = pixels[..., :1]
    if pixels.shape[-1] != c:
        raise ValueError(f"{path} is a grayscale image; the model takes {_expects(shape)}")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def _batch(array: np.ndarray, name: str, shape: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """``(names, (N, C, H, W) array)`` of an array holding one input or a batch."""
    c, h, w = shape
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise ValueError(f"{name} holds {array.dtype} values; give uint8 pixels (0..255) or floats in the model's "
                         "input range")
    if array.shape == shape or (c == 1 and array.shape == (h, w)):
        return [name], array.reshape(1, *shape)
    if (array.ndim == 4 and array.shape[1:] == shape) or (c == 1 and array.ndim == 3 and array.shape[1:] == (h, w)):
        return [f"{name}[{i}]" for i in range(len(array))], array.reshape(-1, *shape)
    hint = " (channels first: transpose (H, W, C) arrays)" if array.shape[-3:] == (h, w, c) else ""
    raise ValueError(f"{name} holds an array of shape {tuple(array.shape)}; the model takes {shape_text(shape)} inputs: "
                     f"arrays {tuple(shape)} or batches (N, {c}, {h}, {w}){hint}")


def read_arrays(path: Path, shape: tuple[int, int, int]) -> list[tuple[list[str], np.ndarray]]:
    """The inputs of a ``.npy`` file or of every array of a ``.npz`` (no pickles)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: cannot read it as {path.suffix} ({' '.join(str(e).split())})") from None
    if isinstance(loaded, np.ndarray):
        return [_batch(loaded, str(path), shape)]
    with loaded:
        return [_batch(loaded[key], f"{path}:{key}", shape) for key in loaded.files]


def to_model_range(net: GloroNet, name: str, array: np.ndarray) -> torch.Tensor:
    """uint8 pixels -> ``lo + (hi − lo)·p/255`` in the model's dtype; floats checked against the
    input range (kept in their own precision: ``certify`` accounts for the cast)."""
    x = torch.from_numpy(np.array(array))  # a writable copy
    if x.dtype == torch.uint8:
        if net.input_range is None:
            raise ValueError(f"{name} holds uint8 pixels, but the model does not record its input range: give floats")
        lo, hi = net.input_range
        x = x.to(next(net.parameters()).dtype).div_(255)  # p/255, as training computed it
        return x if (lo, hi) == (0.0, 1.0) else x.mul_(hi - lo).add_(lo)
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()  # float16 widens exactly
    problem = net.out_of_range(x)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return x


def read_inputs(net: GloroNet, paths: list[str | Path]) -> list[Chunk]:
    """Every input of ``paths`` (files or folders) as ``(names, tensor)`` chunks in the model's range."""
    shape = tuple(int(s) for s in (net.config or {}).get("in_shape", ()))
    if len(shape) != 3:
        raise ValueError("the model does not record its input shape (net.config['in_shape'])")
    chunks = []
    for path in expand(paths):
        if path.suffix.lower() in (".npy", ".npz"):
            parts = read_arrays(path, shape)
        else:
            parts = [([str(path)], read_image(path, shape))]
        chunks += [(names, to_model_range(net, names[0].split("[")[0], a)) for names, a in parts if len(a)]
    if not chunks:
        raise ValueError("no inputs: the files hold empty arrays")
    return chunks


@torch.no_grad()
def predict(net: GloroNet, chunks: list[Chunk], class_names: list[str], epsilon: float | None = None,
            top_k: int | None = None, affinity=None, batch_size: int = 256) -> list[dict]:
    """One row per input: ``file``, ``class``, ``class_name``, ``radius`` (float64, rounded down),
    ``certified`` (``radius > ε``); with ``top_k`` / ``affinity`` also ``certified_k``,
    ``certified_set`` (class indices, highest first), ``certified_set_names`` and ``group``."""
    device = next(net.parameters()).device
    rows = []
    for names, x in chunks:
        for i in range(0, len(x), batch_size):
            cert = net.certify(x[i : i + batch_size].to(device), epsilon)
            rel = net.certify(x[i : i + batch_size].to(device), epsilon, top_k=top_k, affinity=affinity) \
                if (top_k is not None or affinity is not None) else None
            for b, name in enumerate(names[i : i + batch_size]):
                c = int(cert.pred[b])
                row = {"file": name, "class": c, "class_name": class_names[c], "radius": float(cert.radius[b]),
                       "certified": bool(cert.certified[b])}
                if rel is not None:
                    k = int(rel.k[b])
                    members = [int(v) for v in rel.classes[b, :k]]
                    row.update(certified_k=k, certified_set=members,
                               certified_set_names=[class_names[m] for m in members], group=int(rel.group[b]))
                rows.append(row)
    return rows


def _radius_text(r: float) -> str:
    return "inf" if math.isinf(r) else f"{math.floor(r * 1e4) / 1e4:.4f}"  # rounded down, like the radius


def table(rows: list[dict], epsilon: float) -> str:
    """A Markdown table of the rows (radii rounded down to 4 decimals)."""
    relaxed = "certified_k" in rows[0]
    head = f"| file | class | certified radius | certified at ε = {epsilon:g} |" + (" certified set |" if relaxed else "")
    lines = [head, "|---|---|---:|---|" + ("---|" if relaxed else "")]
    for r in rows:
        label = r["class_name"] if r["class_name"] == str(r["class"]) else f"{r['class']} ({r['class_name']})"
        line = (f"| {r['file']} | {label} | {_radius_text(r['radius'])} | "
                f"{'yes' if r['certified'] else 'no'} |")
        if relaxed:
            line += (f" {{{', '.join(r['certified_set_names'])}}} (k = {r['certified_k']}) |" if r["certified_k"]
                     else " none (rejected) |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def check_output(path: str | Path) -> Path:
    """An ``--out`` file must be ``.json`` or ``.csv``."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{path}: predictions are written as .json or .csv, not {path.suffix or 'a file without suffix'}")
    return path


def write_predictions(path: str | Path, rows: list[dict], meta: dict) -> Path:
    """The rows as JSON (``{**meta, "predictions": rows}``) or CSV (one row per input; lists joined
    by ``;``), chosen by the suffix; written atomically. Radii keep full float64 precision."""
    path = check_output(path)
    if path.suffix.lower() == ".json":
        write_text(path, json.dumps({**meta, "predictions": rows}, indent=2) + "\n")
        return path
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else repr(v) if isinstance(v, float) else v
                         for k, v in r.items()})
    write_text(path, buf.getvalue())
    return path
