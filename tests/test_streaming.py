"""Image folders prepared into ArrayRecord, streamed batches, and the batching contract
shared by the in-memory and the streaming sources."""

import itertools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from image_trees import WNIDS, class_folders_tree, slimagenet_tree, tiny_imagenet_tree
from PIL import Image

from rr_jax import batching, datasets, image_folder, inputs, sources, streaming
from rr_jax.config import base_config, validate_config

CLASSES = sorted(WNIDS)  # label order: the sorted class folder names


def pil_image(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def reference_indices(n, batch_size, seed, step, process_index, process_count):
    """The batching contract written out: epoch permutation, global batch, process slice."""
    epoch, b = divmod(step, n // batch_size)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    local = batch_size // process_count
    start = b * batch_size + process_index * local
    return perm[start : start + local]


class CountingSource:
    """A record source that remembers which indices were read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(int(index))
        return self.source[index]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(spec, data_dir) of a tiny-ImageNet tree: 3 classes x 4 train, 5 val images."""
    root = tiny_imagenet_tree(str(tmp_path_factory.mktemp("folders")))
    return datasets.get_dataset_spec("tiny_imagenet", image_folder=root), str(tmp_path_factory.mktemp("tfds"))


# ------------------------------------------------------------------ image folders


def test_tiny_imagenet_layout_labels_class_order_and_pixels(tiny):
    spec, data_dir = tiny
    assert spec.num_classes == 3  # from the tree, not the published 200
    assert sources.class_names(spec, data_dir) == CLASSES
    images, labels = sources.load_split(spec, "train", data_dir)
    files = [os.path.join(spec.image_folder, "train", w, "images", f"{w}_{i}.JPEG") for w in CLASSES for i in range(4)]
    np.testing.assert_array_equal(labels, np.repeat(np.arange(3), 4))
    np.testing.assert_array_equal(images, np.stack([pil_image(f) for f in files]))
    # The test split is val/, labelled by val_annotations.txt in its order.
    images, labels = sources.load_split(spec, "test", data_dir)
    np.testing.assert_array_equal(labels, [CLASSES.index(WNIDS[i % 3]) for i in range(5)])
    np.testing.assert_array_equal(
        images, np.stack([pil_image(os.path.join(spec.image_folder, "val", "images", f"val_{i}.JPEG")) for i in range(5)]))
    assert sources.split_size(spec, "test", data_dir) == 5


def test_slimagenet_layout_labels_and_lossless_pixels(tmp_path):
    root = slimagenet_tree(str(tmp_path / "folders"))
    spec = datasets.get_dataset_spec("slimagenet64", image_folder=root)
    assert spec.num_classes == 3 and spec.mean == (0.5,) * 3 and spec.std == (0.25,) * 3
    for split, count in (("train", 5), ("test", 2)):
        images, labels = sources.load_split(spec, split, str(tmp_path / "tfds"))
        files = [os.path.join(root, split, c, f"{c}_{i}.png") for c in CLASSES for i in range(count)]
        np.testing.assert_array_equal(labels, np.repeat(np.arange(3), count))
        np.testing.assert_array_equal(images, np.stack([pil_image(f) for f in files]))


def test_prepared_split_is_reused_until_the_tree_changes(tmp_path):
    root = slimagenet_tree(str(tmp_path / "folders"), per_class=(2, 1))
    first = image_folder.prepare_split(root, "slimagenet64", "train", str(tmp_path / "cache"))
    stamp = os.stat(first.path).st_mtime_ns
    again = image_folder.prepare_split(root, "slimagenet64", "train", str(tmp_path / "cache"))
    assert again == first and os.stat(again.path).st_mtime_ns == stamp
    Image.new("RGB", (64, 64)).save(os.path.join(root, "train", CLASSES[0], "extra.png"))
    grown = image_folder.prepare_split(root, "slimagenet64", "train", str(tmp_path / "cache"))
    assert grown.num_examples == first.num_examples + 1


def test_corrupt_image_error_names_the_file(tmp_path):
    root = slimagenet_tree(str(tmp_path / "folders"), per_class=(2, 1))
    bad = os.path.join(root, "train", CLASSES[1], f"{CLASSES[1]}_1.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ValueError, match=f"Cannot decode image file {bad}"):
        image_folder.prepare_split(root, "slimagenet64", "train", str(tmp_path / "cache"))
    assert not [f for f in os.listdir(tmp_path / "cache" / "image_folders" / os.listdir(tmp_path / "cache" / "image_folders")[0])
                if f.startswith("train")]  # nothing half-written is left


@pytest.mark.parametrize("layout, match", [
    ("tiny_imagenet", "tiny-imagenet-200.zip"), ("slimagenet64", "SlimageNet64/ directory")])
def test_missing_tree_says_what_to_download(tmp_path, layout, match):
    with pytest.raises(FileNotFoundError, match=match):
        image_folder.class_names(str(tmp_path / "nothing"), layout)


def test_generic_class_folders_resize_variable_sizes(tmp_path):
    rng = np.random.default_rng(3)
    sizes = {"b": (40, 70), "a": (90, 30)}  # (height, width)
    for name, (h, w) in sizes.items():
        os.makedirs(tmp_path / "tree" / name)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "tree" / name / "x.png")
    spec = datasets.get_dataset_spec("image_folder", image_folder=str(tmp_path / "tree"), image_shape=(20, 20, 3))
    images, labels = sources.load_split(spec, "train", str(tmp_path / "tfds"))
    np.testing.assert_array_equal(labels, [0, 1])
    for image, name in zip(images, ("a", "b")):  # shorter side to 20, then the central 20x20
        h, w = sizes[name]
        scale = 20 / min(h, w)
        size = (round(w * scale), round(h * scale))
        full = pil_image(tmp_path / "tree" / name / "x.png")
        resized = np.asarray(Image.fromarray(full).resize(size, Image.BILINEAR))
        top, left = (size[1] - 20) // 2, (size[0] - 20) // 2
        np.testing.assert_array_equal(image, resized[top : top + 20, left : left + 20])


# ------------------------------------------------------------- batching contract


@pytest.mark.parametrize("process_count, local_devices", [(1, 1), (2, 2)])
def test_streaming_and_memory_give_the_same_batches(tiny, process_count, local_devices):
    spec, data_dir = tiny
    images, labels = sources.load_split(spec, "train", data_dir)
    source = sources.record_source(spec, "train", data_dir)
    n, batch_size, seed, steps = len(labels), 4, 7, 7  # 3 steps per epoch: crosses two epochs
    for p in range(process_count):
        layout = dict(global_batch_size=batch_size, seed=seed, process_index=p, process_count=process_count,
                      local_device_count=local_devices)
        memory = list(itertools.islice(batching.batches(images, labels, **layout), steps))
        streamed = list(itertools.islice(streaming.stream_batches(source, read_threads=3, prefetch_steps=2, **layout),
                                         steps))
        resumed = list(itertools.islice(streaming.stream_batches(source, start_step=4, **layout), steps - 4))
        for step, (a, b) in enumerate(zip(memory, streamed)):
            idx = reference_indices(n, batch_size, seed, step, p, process_count)
            shape = (local_devices, batch_size // process_count // local_devices)
            np.testing.assert_array_equal(a["label"], labels[idx].reshape(shape))
            np.testing.assert_array_equal(a["image"], images[idx].reshape(*shape, 64, 64, 3))
            for key in ("image", "label"):
                np.testing.assert_array_equal(b[key], a[key])
        for a, b in zip(memory[4:], resumed):
            np.testing.assert_array_equal(b["image"], a["image"])


def test_each_process_reads_only_its_slice(tiny):
    spec, data_dir = tiny
    source = sources.record_source(spec, "train", data_dir)
    for p in range(2):
        counting = CountingSource(source)
        stream = streaming.stream_batches(counting, global_batch_size=4, seed=1, process_index=p, process_count=2,
                                          read_threads=1, prefetch_steps=1)
        for _ in range(3):
            next(stream)
        expected = [reference_indices(12, 4, 1, s, p, 2) for s in range(3)]
        assert sorted(counting.read[:6]) == sorted(np.concatenate(expected).tolist())


def test_stream_eval_batches_match_eval_batches(tiny):
    spec, data_dir = tiny
    images, labels = sources.load_split(spec, "train", data_dir)
    source = sources.record_source(spec, "train", data_dir)
    for p in range(2):  # 12 examples in batches of 8: the second is half padding
        layout = dict(process_index=p, process_count=2, local_device_count=2)
        memory = list(batching.eval_batches(images, labels, 8, **layout))
        streamed = list(streaming.stream_eval_batches(source, 8, **layout))
        assert len(memory) == len(streamed) == 2
        for b, (x, y) in enumerate(zip(memory, streamed)):
            idx = np.arange(b * 8 + p * 4, b * 8 + p * 4 + 4)
            np.testing.assert_array_equal(x["mask"].ravel(), idx < 12)
            np.testing.assert_array_equal(x["label"].ravel(), labels[np.minimum(idx, 11)])
            for key in ("image", "label", "mask"):
                np.testing.assert_array_equal(y[key], x[key])


class StreamingTestDigits(tfds.core.GeneratorBasedBuilder):
    """A registered 100-example TFDS dataset of random 8x8x1 images, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)), "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(100):
            yield i, {"image": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), "label": i % 10}


DIGITS = datasets.DatasetSpec(tfds_name="streaming_test_digits", image_shape=(8, 8, 1), num_classes=10, mean=(0.5,),
                          std=(0.5,), pretrain_split="train", train_split="train", test_split="train")


def test_tfds_array_record_stream_matches_tfrecord_in_memory(tmp_path):
    tfrecord_dir, array_record_dir = str(tmp_path / "tfrecord"), str(tmp_path / "array_record")
    split = "train[:96]"
    images, labels = sources.load_split(DIGITS, split, tfrecord_dir)  # prepared as TFRecord, read by tf.data
    source = sources.record_source(DIGITS, split, array_record_dir)  # prepared as ArrayRecord, tfds.data_source
    assert not sources.supports_random_access(DIGITS, tfrecord_dir)
    assert sources.supports_random_access(DIGITS, array_record_dir)
    assert len(source) == len(labels) == 96
    layout = dict(global_batch_size=32, seed=3, process_index=1, process_count=2, local_device_count=2)
    memory = itertools.islice(batching.batches(images, labels, **layout), 5)
    streamed = itertools.islice(streaming.stream_batches(source, **layout), 5)
    for step, (a, b) in enumerate(zip(memory, streamed)):
        idx = reference_indices(96, 32, 3, step, 1, 2)
        np.testing.assert_array_equal(a["label"].ravel(), labels[idx])
        for key in ("image", "label"):
            np.testing.assert_array_equal(b[key], a[key])
    with pytest.raises(ValueError, match="prepared as tfrecord.*array_record"):
        sources.record_source(DIGITS, split, tfrecord_dir)


# --------------------------------------------------------------------- config


def test_inputs_choose_the_source_by_config(tiny):
    spec, data_dir = tiny
    config = base_config()
    config.dataset, config.image_folder, config.data_dir = "tiny_imagenet", spec.image_folder, data_dir
    config.data.image_size = 32
    assert inputs.dataset_spec(config).image_shape == (32, 32, 3)
    config.data.image_size = None
    assert inputs.dataset_spec(config) == spec
    assert not inputs.streams(config, spec, "train")  # 12 images: well under the limit
    config.data.in_memory_limit_mib = 1
    big = inputs.dataset_spec(config, "tiny_imagenet")
    assert not inputs.streams(config, big, "train")  # 0.14 MiB
    config.data.image_size = 300  # 12 x 300 x 300 x 3 bytes = 3.1 MiB: auto streams
    assert inputs.streams(config, inputs.dataset_spec(config), "train")
    config.data.streaming = "memory"
    assert not inputs.streams(config, spec, "train")
    config.data.streaming = "both"
    with pytest.raises(ValueError, match="'both'.*'auto', 'stream', 'memory'"):
        inputs.streams(config, spec, "train")


@pytest.mark.parametrize("overrides, match", [
    ({"dataset": "tiny_imagenet"}, r"config.image_folder=None.*tiny-imagenet-200.zip"),
    ({"image_folder": "/data/tree"}, r"config.image_folder='/data/tree'.*'cifar10' is not an image folder"),
    ({"data.streaming": "yes"}, r"config.data.streaming='yes'.*'auto', 'stream', 'memory'"),
    ({"data.read_threads": 0}, r"config.data.read_threads=0"),
    ({"data.image_size": -4}, r"config.data.image_size=-4"),
])
def test_bad_data_configs_raise(overrides, match):
    config = base_config()
    for key, value in overrides.items():
        *parents, last = key.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[last] = value
    with pytest.raises(ValueError, match=match):
        validate_config(config, device_count=1)


def test_imagenet_config_is_valid_and_missing_files_say_where_to_put_them(tmp_path):
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(
        "imagenet", os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet.py"))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config()
    validate_config(config, device_count=8)
    assert (config.model.backbone, config.data.streaming) == ("resnet50", "stream")
    spec = inputs.dataset_spec(config)
    assert spec.image_shape == (224, 224, 3) and spec.num_classes == 1000
    manual = os.path.join(str(tmp_path), "downloads", "manual")
    with pytest.raises(FileNotFoundError, match=f"ILSVRC2012_img_train.tar.*{manual}"):
        sources.record_source(spec, "train", str(tmp_path))


def test_a_tree_without_a_test_split_holds_out_a_balanced_seeded_part_of_train(tmp_path):
    root, files = class_folders_tree(str(tmp_path))  # classes n01, n02, n03: 7, 3, 10 images
    labels = np.repeat(np.arange(3), (7, 3, 10))
    config = base_config()
    config.dataset, config.image_folder, config.data.image_size = "image_folder", root, 16
    config.probe.holdout_fraction = 0.25
    spec = inputs.dataset_spec(config)
    assert (spec.holdout, spec.test_split) == (datasets.Holdout(0.25, 0), datasets.HELD_OUT_SPLIT)
    assert spec.describe_split(spec.test_split) == "held out 25% of train (class-balanced, seed 0)"
    data_dir = str(tmp_path / "tfds")
    held_images, held_labels = sources.load_split(spec, spec.test_split, data_dir)
    train_images, train_labels = sources.load_split(spec, spec.train_split, data_dir)
    # Each class keeps round(25%) of its images, at least one: 7 -> 2, 3 -> 1, 10 -> 2.
    np.testing.assert_array_equal(np.bincount(held_labels), [2, 1, 2])
    np.testing.assert_array_equal(np.bincount(train_labels), [5, 2, 8])
    assert sources.split_size(spec, spec.test_split, data_dir) == 5 and sources.split_size(spec, "train", data_dir) == 15
    # Together the two are the tree, each image once; the held-out ones are in neither twice.
    pixels = {pil_image(f).tobytes(): label for f, label in zip(files, labels)}
    seen = [image.tobytes() for image in np.concatenate([held_images, train_images])]
    assert sorted(seen) == sorted(pixels) and len(set(seen)) == 20
    assert [pixels[image.tobytes()] for image in held_images] == list(held_labels)
    # The same images from the saved config (the probe's), another seed other images.
    again = inputs.dataset_spec(config.to_dict())
    np.testing.assert_array_equal(sources.load_split(again, again.test_split, data_dir)[0], held_images)
    config.probe.holdout_seed = 1
    other = inputs.dataset_spec(config)
    assert not np.array_equal(sources.load_split(other, other.test_split, data_dir)[0], held_images)
    # No hold-out with a fraction of 0, in configs saved without the fields, or with a test split.
    config.probe.holdout_fraction = 0.0
    assert inputs.dataset_spec(config).holdout is None
    saved = config.to_dict()
    del saved["probe"]["holdout_fraction"]
    assert inputs.dataset_spec(saved).holdout is None
    config.probe.holdout_fraction = 0.25
    os.makedirs(os.path.join(root, "train"))
    for name in CLASSES:
        os.replace(os.path.join(root, name), os.path.join(root, "train", name))
    slimagenet = slimagenet_tree(str(tmp_path / "with_test"))
    assert inputs.dataset_spec(config).holdout is not None  # ROOT/train without ROOT/test
    config.image_folder = slimagenet
    assert inputs.dataset_spec(config).holdout is None and inputs.dataset_spec(config).test_split == "test"
