"""Small synthetic datasets in the real on-disk formats (IDX, CIFAR pickles, image folders), for
tests of the loaders and of commands that need a dataset no registry carries."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def idx_bytes(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return struct.pack(">I", 0x800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_idx(folder: Path, n_train=12, n_test=7, gz=True, seed=0, label_offset=0):
    """Fake MNIST in IDX format; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = ((np.arange(n) + label_offset) % 10).astype(np.uint8)
        for kind, a, nd in (("images", x, 3), ("labels", y, 1)):
            name = f"{prefix}-{kind}-idx{nd}-ubyte"
            raw = idx_bytes(a)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        out[prefix] = (x, y)
    return out


def cifar_pickle(n, num_classes, label_key, seed, protocol=2, bytes_keys=True):
    rng = np.random.default_rng(seed)
    d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         label_key: [int(v) for v in rng.integers(0, num_classes, n)],
         "batch_label": "synthetic"}
    if bytes_keys:  # as the real (python 2) files look under encoding="bytes"
        d = {k.encode(): v for k, v in d.items()}
    return pickle.dumps(d, protocol=protocol), d


def write_cifar10(folder: Path, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    dicts = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        blob, d = cifar_pickle(n, 10, "labels", seed=i, protocol=2 if i % 2 else 4, bytes_keys=i % 3 != 0)
        (folder / name).write_bytes(blob)
        dicts[name] = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    return dicts


def write_cifar100(folder: Path, n=6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("train", "test")):
        (folder / name).write_bytes(cifar_pickle(n, 100, "fine_labels", seed=i)[0])


def write_image_folder(root: Path, layout: str, size: int, classes=("c0", "c1"), per_class: int = 2) -> None:
    """Random RGB images: ``layout="imagenet"`` (``{train,val}/<class>/*.JPEG``) or
    ``"tiny-imagenet"`` (``wnids.txt``, ``train/<wnid>/images``, ``val/images`` +
    ``val_annotations.txt``). Needs Pillow."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def save(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)

    if layout == "imagenet":
        for split in ("train", "val"):
            for c in classes:
                for k in range(per_class):
                    save(root / split / c / f"{k}.JPEG")
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(classes) + "\n")
    lines = []
    for c in classes:
        for k in range(per_class):
            save(root / "train" / c / "images" / f"{c}_{k}.JPEG")
            save(root / "val" / "images" / f"val_{c}_{k}.JPEG")
            lines.append(f"val_{c}_{k}.JPEG\t{c}\t0\t0\t{size - 1}\t{size - 1}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def write_fake(name: str, root: Path, n: int = 6) -> None:
    """A few samples of dataset ``name`` under ``root/<name>/`` in its real format."""
    folder = root / name
    if name in ("mnist", "fashion-mnist"):
        write_idx(folder, n_train=n, n_test=n)
    elif name == "cifar10":
        write_cifar10(folder, n)
    elif name == "cifar100":
        write_cifar100(folder, n)
    elif name in ("tiny-imagenet", "imagenet"):
        write_image_folder(folder, name, 64 if name == "tiny-imagenet" else 224, per_class=max(1, n // 2))
    else:
        raise ValueError(f"no fake writer for {name!r}")
