"""Test setup: 8 fake CPU devices for pmap and launch.py's XLA:CPU flags, set before any
JAX backend starts (importing rr_jax starts none)."""

import os

from rr_jax.xla_flags import with_cpu_defaults

# The tests run what users run: launch.py's XLA:CPU defaults (YNNPACK fusions off).
os.environ["XLA_FLAGS"] = with_cpu_defaults(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_platforms", "cpu")

import contextlib  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402,F811
import signal  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402


@contextlib.contextmanager
def mocked_tfds(data_dir, num_examples, names=("cifar10", "cifar100")):
    """tfds.testing.mock_data with the real schemas of `names`, marked as prepared in
    `data_dir` so that rr_jax.sources.load_split reads (random) examples without a download."""
    for name in names:
        builder = tfds.builder(name, data_dir=str(data_dir))
        os.makedirs(builder.data_dir, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir)):
        yield


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """A TFDS data_dir holding Fashion-MNIST, prepared once per session from Debian's files."""
    from rr_jax import datasets, sources

    if not os.path.isdir(datasets.DEBIAN_FASHION_MNIST_DIR):
        pytest.skip(f"{datasets.DEBIAN_FASHION_MNIST_DIR} is absent: apt-get install dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("tfds")
    spec = datasets.get_dataset_spec("fashion_mnist")
    for split in (spec.train_split, spec.test_split):
        sources.load_split(spec, split, str(root), download=False)
    return root


@pytest.fixture(scope="module", autouse=True)
def free_compiled_code():
    """Frees each test module's compiled executables after it. Every executable keeps a
    few memory mappings of its JIT-compiled code; the whole suite in one process reached
    the kernel's limit (vm.max_map_count, 65 530), where XLA:CPU's LLVM aborted the
    process ("Unable to allocate section memory")."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def fast_compile():
    """Compile time dominates the small runs of a test module; XLA's optimisations do not
    change results, so they are off for the module's tests that ask for this."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def numpy_knn_top1(bank, bank_labels, queries, query_labels, k, temperature, num_classes, tie=1e-4):
    """Weighted kNN top-1 by loops: cosine similarity, the k nearest vote exp(sim / T).

    Returns (top-1, slack): slack is the fraction of queries whose answer hangs on a near
    tie (the k-th and (k+1)-th similarities, or the two best votes, within `tie`), where
    float32 round-off in the code under test may rightly decide the other way."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = queries @ bank.T
    correct = ambiguous = 0
    for row, label in zip(similarity, query_labels):
        order = np.argsort(-row)
        nearest = order[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, bank_labels[nearest], np.exp(row[nearest] / temperature))
        best, runner_up = np.sort(votes)[::-1][:2]
        correct += votes.argmax() == label
        ambiguous += (row[order[k - 1]] - row[order[k]] < tie) or (best - runner_up < tie * best)
    return correct / len(query_labels), ambiguous / len(query_labels)


def sigint_as_in_a_terminal():
    """A preexec_fn that gives a child SIGINT's default action where this process ignores
    it (a background job: ignored signals stay ignored across exec); else None."""
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        return None
    return lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(path, predicate, process, timeout=600):
    """Polls until `path` exists and `predicate(path)` holds; fails if `process` ends first."""
    deadline = time.time() + timeout
    while not (path.exists() and predicate(path)):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.3)
