"""Tests of the data modules: specs (datasets), preparation (prepare), loading (sources), order and prefetch (batching)."""

import dataclasses
import gzip
import os
import shutil

import jax
import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds

from rr_jax import batching, datasets, prepare, sources

FASHION_DIR = datasets.DEBIAN_FASHION_MNIST_DIR


def _files(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*")) if root.exists() else []


# ---------------------------------------------------------------------- specs


def test_label_spaces_of_cifar100():
    fine = datasets.get_dataset_spec("cifar100")
    coarse = datasets.get_dataset_spec("cifar100", "coarse")
    assert (fine.label_key, fine.num_classes) == ("label", 100)
    assert (coarse.label_key, coarse.num_classes) == ("coarse_label", 20)
    assert coarse.mean == fine.mean == (0.507, 0.487, 0.441)
    stl = datasets.get_dataset_spec("stl10")
    assert (stl.pretrain_split, stl.train_split, stl.image_shape) == (
        "unlabelled", "train", (96, 96, 3))


def test_overrides_and_custom_spec():
    spec = datasets.get_dataset_spec("cifar10", train_split="train[:10%]", mean=[0.5, 0.5, 0.5])
    assert spec.train_split == "train[:10%]" and spec.mean == (0.5, 0.5, 0.5)
    custom = datasets.DatasetSpec(
        tfds_name="mnist", image_shape=[28, 28, 1], num_classes=10, mean=[0.13], std=[0.31],
        pretrain_split="train", train_split="train", test_split="test",
    )
    assert custom.image_shape == (28, 28, 1) and custom.mean == (0.13,)
    assert custom.label_key == "label" and custom.offline_dir is None
    assert {custom: 1}[dataclasses.replace(custom)] == 1  # immutable and hashable


@pytest.mark.parametrize("call, match", [
    (lambda: datasets.get_dataset_spec("cifar11"), r"'cifar11'.*'cifar10', 'cifar100'"),
    (lambda: datasets.get_dataset_spec("cifar100", "superclass"), r"'superclass'.*'fine', 'coarse'"),
    (lambda: datasets.get_dataset_spec("cifar10", std_dev=1.0), r"\['std_dev'\]"),
    (lambda: datasets.get_dataset_spec("cifar10", mean=(0.5,)), r"mean must hold 3"),
    (lambda: datasets.get_dataset_spec("cifar10", std=(1.0, 0.0, 1.0)), r"std must hold 3 positive"),
    (lambda: datasets.get_dataset_spec("cifar10", offline_dir="/x"), r"'fashion_mnist'.*'cifar10'"),
    (lambda: datasets.get_dataset_spec("stl10", image_shape=(96, 96)), r"\(96, 96\)"),
])
def test_bad_specs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------- TFDS, mocked data


@pytest.fixture
def mock_tfds(tmp_path):
    """Mocked TFDS with the real cifar10/cifar100 schemas, marked as prepared."""
    for name in ("cifar10", "cifar100"):
        builder = tfds.builder(name, data_dir=str(tmp_path))
        os.makedirs(builder.data_dir)
        builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=37, data_dir=str(tmp_path)):
        yield


@pytest.mark.parametrize("name, label_space, key, num_classes", [
    ("cifar10", None, "label", 10),
    ("cifar100", "fine", "label", 100),
    ("cifar100", "coarse", "coarse_label", 20),
])
def test_load_split_reads_the_label_space(mock_tfds, name, label_space, key, num_classes):
    images, labels = sources.load_split(datasets.get_dataset_spec(name, label_space), "train")
    assert images.dtype == np.uint8 and images.shape == (37, 32, 32, 3)
    assert labels.dtype == np.int32 and labels.shape == (37,)
    reference = next(iter(tfds.as_numpy(tfds.builder(name).as_dataset(
        split="train", shuffle_files=False, batch_size=100))))
    np.testing.assert_array_equal(images, reference["image"])
    np.testing.assert_array_equal(labels, reference[key])
    assert labels.min() >= 0 and labels.max() < num_classes
    batch = next(batching.batches(images, labels, global_batch_size=8, seed=0, local_device_count=2))
    assert batch["image"].shape == (2, 4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (2, 4) and batch["label"].dtype == np.int32
    if name == "cifar100":  # the two label spaces really are different features
        other = "label" if key == "coarse_label" else "coarse_label"
        assert not np.array_equal(labels, reference[other])


def test_load_split_checks_the_spec_against_tfds(mock_tfds):
    wrong = datasets.get_dataset_spec("cifar100", num_classes=10)
    with pytest.raises(ValueError, match=r"has 100 classes; spec.num_classes=10"):
        sources.load_split(wrong, "train")
    with pytest.raises(ValueError, match=r"'fine_label'.*'coarse_label'"):
        sources.load_split(datasets.get_dataset_spec("cifar100", label_key="fine_label"), "train")


# --------------------------------------------------------------- batch order


def _split(n=103, shape=(4, 4, 3)):
    """Example i has label i and all pixels i % 256, so batches can be traced back."""
    labels = np.arange(n, dtype=np.int32)
    images = np.broadcast_to((labels % 256).astype(np.uint8)[:, None, None, None], (n, *shape))
    return np.ascontiguousarray(images), labels


def _take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def test_batches_shapes_and_epoch_coverage():
    images, labels = _split()
    m, steps = 20, batching.steps_per_epoch(103, 20)
    assert steps == 5
    out = _take(batching.batches(images, labels, global_batch_size=m, seed=3,
                             local_device_count=4), 3 * steps)
    for b in out:
        assert b["image"].shape == (4, 5, 4, 4, 3) and b["image"].dtype == np.uint8
        assert b["label"].shape == (4, 5) and b["label"].dtype == np.int32
        np.testing.assert_array_equal(b["image"][..., 0, 0, 0], b["label"] % 256)
    epochs = [np.concatenate([b["label"].ravel() for b in out[e * steps:(e + 1) * steps]])
              for e in range(3)]
    for e in epochs:  # every example at most once, exactly 100 of 103 seen
        assert len(np.unique(e)) == 100 and set(e) <= set(range(103))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(np.sort(epochs[0]), np.sort(epochs[1]))  # remainder differs too
    # Order over many epochs is uniform: each example is dropped ~3/103 of the time.
    many = _take(batching.batches(images, labels, global_batch_size=m, seed=0), 400 * steps)
    counts = np.bincount(np.concatenate([b["label"].ravel() for b in many]), minlength=103)
    expected = 400 * 100 / 103
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected * 3 / 103)


def test_batches_are_a_function_of_seed_and_step():
    images, labels = _split()
    kw = dict(global_batch_size=10, local_device_count=2)
    run = _take(batching.batches(images, labels, seed=7, **kw), 35)
    again = _take(batching.batches(images, labels, seed=7, **kw), 35)
    other = _take(batching.batches(images, labels, seed=8, **kw), 35)
    assert all(np.array_equal(a["label"], b["label"]) for a, b in zip(run, again))
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(run, other))
    for s in (1, 9, 10, 23):  # mid-epoch, epoch ends, later epoch
        resumed = _take(batching.batches(images, labels, seed=7, start_step=s, **kw), 35 - s)
        for a, b in zip(run[s:], resumed):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("process_count, local_device_count", [(2, 1), (4, 2)])
def test_processes_together_see_the_global_batch(process_count, local_device_count):
    images, labels = _split()
    kw = dict(global_batch_size=16, seed=5, start_step=4)
    single = _take(batching.batches(images, labels, **kw), 12)
    shards = [_take(batching.batches(images, labels, process_index=p, process_count=process_count,
                                 local_device_count=local_device_count, **kw), 12)
              for p in range(process_count)]
    for step, one in enumerate(single):
        for key in ("image", "label"):
            joined = np.concatenate([s[step][key].reshape(-1, *one[key].shape[2:])
                                     for s in shards])
            np.testing.assert_array_equal(joined, one[key][0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_batch_size=10, local_device_count=4), r"10 must be divisible by .* 1 \* 4"),
    (dict(global_batch_size=8, process_index=2, process_count=2), r"process_index must be in"),
    (dict(global_batch_size=104), r"global_batch_size must be in \[1, num_examples=103\]"),
    (dict(global_batch_size=8, seed=-1), r"non-negative"),
])
def test_bad_batch_arguments_raise(kwargs, match):
    images, labels = _split()
    with pytest.raises(ValueError, match=match):
        next(batching.batches(images, labels, **{"seed": 0, **kwargs}))


def test_eval_batches_cover_the_split_in_order_on_every_process():
    images, labels = _split(n=23)
    per_process = [list(batching.eval_batches(images, labels, 8, process_index=p, process_count=2,
                                          local_device_count=2)) for p in range(2)]
    assert [len(b) for b in per_process] == [3, 3]  # ceil(23 / 8) steps everywhere
    seen_images, seen_labels = [], []
    for step in range(3):
        for p in range(2):
            b = per_process[p][step]
            assert b["image"].shape == (2, 2, 4, 4, 3) and b["mask"].shape == (2, 2)
            mask = b["mask"].ravel()
            seen_images.append(b["image"].reshape(4, 4, 4, 3)[mask])
            seen_labels.append(b["label"].ravel()[mask])
    np.testing.assert_array_equal(np.concatenate(seen_labels), labels)
    np.testing.assert_array_equal(np.concatenate(seen_images), images)


# ------------------------------------------------------------------- prefetch


def test_prefetch_to_devices_shards_bounded_and_feeds_pmap():
    images, labels = _split()
    n_dev = jax.local_device_count()
    assert n_dev == 8
    source = batching.batches(images, labels, global_batch_size=16, seed=1, local_device_count=8)
    expected = _take(batching.batches(images, labels, global_batch_size=16, seed=1,
                                  local_device_count=8), 3)
    pulled = []

    def counting():
        for b in source:
            pulled.append(1)
            yield b

    it = batching.prefetch_to_devices(counting(), size=2)
    first = next(it)
    assert len(pulled) == 2  # the buffer holds `size` batches, no more
    for got, want in zip([first, next(it), next(it)], expected):
        assert isinstance(got["image"], jax.Array)
        for shard in got["image"].addressable_shards:
            i = shard.index[0].start
            assert shard.device == jax.local_devices()[i]
            np.testing.assert_array_equal(np.asarray(shard.data)[0], want["image"][i])
        sums = jax.pmap(lambda x: x.astype(np.int32).sum())(got["image"])
        np.testing.assert_array_equal(
            np.asarray(sums), want["image"].astype(np.int64).reshape(8, -1).sum(1))
    with pytest.raises(ValueError, match=r"leading axis of 8"):
        next(batching.prefetch_to_devices(iter([{"x": np.zeros((4, 2))}])))


# ---------------------------------------------------------- missing datasets


def test_missing_dataset_without_download_says_how_to_get_it(tmp_path):
    spec = datasets.get_dataset_spec("fashion_mnist", offline_dir=str(tmp_path / "nowhere"))
    root = tmp_path / "tfds"
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        sources.load_split(spec, "train", str(root), download=False)
    with pytest.raises(FileNotFoundError, match=r"network access.*cifar10/<version>"):
        sources.load_split(datasets.get_dataset_spec("cifar10"), "test", str(root), download=False)
    assert _files(root) == []


def test_unreachable_download_fails_fast_and_writes_nothing(tmp_path, monkeypatch):
    def no_network(url, **kwargs):
        raise requests.ConnectionError(f"no route to {url}")

    monkeypatch.setattr(requests, "head", no_network)
    spec = datasets.get_dataset_spec("fashion_mnist", offline_dir=str(tmp_path / "nowhere"))
    root = tmp_path / "tfds"
    with pytest.raises(FileNotFoundError, match=r"fashion-mnist\.s3.*apt-get install"):
        sources.load_split(spec, "train", str(root))
    assert _files(root) == []


# -------------------------------------------------------- offline Fashion-MNIST

needs_debian_files = pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason=f"{FASHION_DIR} is absent: `apt-get install dataset-fashion-mnist` provides it",
)


def _read_idx(name):
    with gzip.open(os.path.join(FASHION_DIR, name)) as f:
        raw = f.read()
    if "images" in name:
        return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28, 1)
    return np.frombuffer(raw, np.uint8, offset=8)


def _as_rows(images, labels):
    """Sorted (image, label) records, to compare splits whatever their order."""
    rows = np.concatenate([images.reshape(len(images), -1), labels[:, None].astype(np.uint8)], 1)
    return np.sort(np.ascontiguousarray(rows).view(f"V{rows.shape[1]}").ravel())


@pytest.fixture(scope="module")
def fashion(fashion_mnist_dir):
    """Fashion-MNIST prepared once from the Debian files into a fresh data_dir."""
    root = fashion_mnist_dir
    spec = datasets.get_dataset_spec("fashion_mnist")
    return root, spec, {s: sources.load_split(spec, s, str(root), download=False)
                        for s in ("train", "test")}


@needs_debian_files
def test_offline_fashion_mnist_is_the_real_data(fashion):
    root, spec, splits = fashion
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        images, labels = splits[split]
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
        reference = (_read_idx(f"{prefix}-images-idx3-ubyte.gz"),
                     _read_idx(f"{prefix}-labels-idx1-ubyte.gz"))
        np.testing.assert_array_equal(_as_rows(images, labels), _as_rows(*reference))
    pixels = splits["train"][0] / 255.0
    np.testing.assert_allclose([pixels.mean(), pixels.std()], [spec.mean[0], spec.std[0]],
                               atol=5e-5)
    # The regular TFDS dataset (load_split read it with TFDS's own builder), and nothing
    # temporary is left.
    builder = tfds.builder("fashion_mnist", data_dir=str(root))
    assert type(builder) is tfds.image_classification.FashionMNIST and builder.is_prepared()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 60000, "test": 10000}
    assert sorted(os.listdir(root)) == ["fashion_mnist"]


def test_batched_png_encoding_writes_what_tfds_writes():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    feature = tfds.features.Image(shape=(28, 28, 1))
    assert list(prepare._encode_pngs(images).numpy()) == [feature.encode_example(x) for x in images]


@needs_debian_files
def test_failed_offline_preparation_leaves_nothing(tmp_path):
    source = tmp_path / "files"
    source.mkdir()
    for name in os.listdir(FASHION_DIR):
        os.symlink(os.path.join(FASHION_DIR, name), source / name)
    os.remove(source / "t10k-labels-idx1-ubyte.gz")
    with gzip.open(source / "t10k-labels-idx1-ubyte.gz", "wb") as f:  # truncated
        f.write(gzip.open(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz")).read()[:5000])
    spec = datasets.get_dataset_spec("fashion_mnist", offline_dir=str(source))
    root = tmp_path / "tfds"
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte is not the expected idx"):
        sources.load_split(spec, "train", str(root), download=False)
    assert _files(root) == []
    shutil.rmtree(source)
