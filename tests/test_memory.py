"""The memory check of the train step: XLA's estimate against an injected limit, the
largest K and M that fit, out-of-memory errors at run time, one compile per run."""

import functools
import re
import types

import jax
import jax.numpy as jnp
import pytest
from conftest import mocked_tfds
from test_pipeline import load_config, tiny

from rr_jax import inputs, memory, train
from rr_jax.config import base_config
from rr_jax.errors import OutOfMemoryError
from rr_jax.optimizer import make_optimizer
from rr_jax.step import make_backbone, make_objective, parallel_train_step


def analysed_bytes(compiled):
    """The step's bytes from the raw fields of XLA's memory analysis."""
    a = compiled.memory_analysis()
    return (a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes
            + a.generated_code_size_in_bytes)


@pytest.fixture(scope="module")
def step(fast_compile):
    """conv4 on 28x28x1 images, K=6, M=32 (4 on each of the 8 devices): lowered, never
    run. `compiled` keeps every executable compiled through `lower`, by overrides."""
    config = base_config()
    config.dataset, config.model.backbone = "fashion_mnist", "conv4"
    config.relational.num_views, config.batch_size = 6, 32
    spec = inputs.dataset_spec(config)
    objective, backbone = make_objective(config, spec), make_backbone(config)
    optimizer = make_optimizer(config, 10)
    state = train._initial_state(config, spec, objective, backbone, optimizer, 10, 100)
    lower_step = functools.partial(train._lower_step, config, spec, state=state, total_steps=10, num_examples=100,
                                   labelled_alongside=False)
    compiled = {}

    def lower(overrides):
        lowered, key = lower_step(overrides), tuple(overrides.items())

        def compile(*options):
            if key not in compiled:
                compiled[key] = lowered.compile(*options)
            return compiled[key]

        return types.SimpleNamespace(compile=compile)

    return types.SimpleNamespace(lower=lower, sizes=train._searched_sizes(config), compiled=compiled, config=config)


def need_at(step, key=None, value=None):
    """Bytes of the step at {key: value} from XLA's analysis of its executable (compiled
    by the search, or here)."""
    overrides = {key: value} if key else {}
    if tuple(overrides.items()) not in step.compiled:
        step.lower(overrides).compile()
    return analysed_bytes(step.compiled[tuple(overrides.items())])


def test_sizes_searched_are_k_and_m_in_steps_of_the_device_count(step):
    assert [(s.name, s.key, s.value, s.minimum, s.step) for s in step.sizes] == [
        ("K", "relational.num_views", 6, 2, 1), ("M", "batch_size", 32, 16, 8)]
    config = step.config.copy_and_resolve_references()
    config.method = "simclr"  # no num_views field: only M is searched
    assert [s.name for s in train._searched_sizes(config)] == ["M"]


def test_a_step_that_cannot_fit_fails_with_the_bytes_and_the_largest_k_and_m_that_fit(step):
    need = need_at(step)
    limit = int(0.7 * need)
    with pytest.raises(OutOfMemoryError) as error:
        memory.compile_checked(step.lower, step.sizes, devices=jax.local_devices(),
                               memory=memory.Memory(limit, "the test's limit"))
    message = str(error.value)
    assert f"The train step (K=6, M=32) needs {need:,} bytes" in message
    assert f"more than the {limit:,} bytes" in message and "of the test's limit" in message
    k = int(re.search(r"K: relational\.num_views=(\d+)", message).group(1))
    m = int(re.search(r"M: batch_size=(\d+)", message).group(1))
    assert 2 <= k < 6 and m in (16, 24), message
    # What the message claims, against XLA's analysis of the executables at those sizes.
    assert need_at(step, "relational.num_views", k) <= limit < need_at(step, "relational.num_views", k + 1)
    assert need_at(step, "batch_size", m) <= limit < need_at(step, "batch_size", m + 8)
    assert f"relational.num_views={k} (needs {memory._size(need_at(step, 'relational.num_views', k))})" in message
    assert len(step.compiled) <= 7  # the run's size; two more to fit K, one to fit M; a few to confirm


def test_a_step_that_fits_is_returned_compiled_and_logs_its_estimate(step, caplog):
    need = need_at(step)
    caplog.set_level("INFO")
    checked = memory.compile_checked(step.lower, step.sizes, devices=jax.local_devices(),
                                     memory=memory.Memory(need, "the test's limit"))  # exactly enough
    assert checked._compiled is step.compiled[()]
    assert f"The train step needs {memory._size(need)} of {memory._size(need)} (the test's limit;" in caplog.text


def test_search_compiles_give_the_analysis_of_the_run_compile(step):
    """The search compiles without LLVM's optimisations (as `fast_compile` does): XLA's
    buffer assignment, and so the analysis, is that of the run's compile."""
    lowered = train._lower_step(step.config, inputs.dataset_spec(step.config), {"relational.num_views": 3},
                                state=None, total_steps=10, num_examples=100, labelled_alongside=False)
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        as_run = analysed_bytes(lowered.compile())
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    assert analysed_bytes(lowered.compile(memory._SEARCH_COMPILER_OPTIONS["cpu"])) == as_run


def test_largest_fitting_agrees_with_brute_force():
    for degree, curve in ((2, lambda v: 1000 + 7 * v + 3 * v * v),   # the relation head's K(K-1)
                          (1, lambda v: 500 + 40 * v),                 # the batch
                          (2, lambda v: 100 * v + (v // 5) * 900)):    # not a polynomial: steps
        size = memory.Size("K", "k", value=40, minimum=2, degree=degree)
        for limit in range(0, curve(40) + 10, 97):
            calls = []
            found = memory.largest_fitting(size, lambda v: calls.append(v) or curve(v), limit)
            fitting = [v for v in range(2, 40) if curve(v) <= limit]
            assert found == (fitting[-1] if fitting else None), (degree, limit)
        assert len(set(calls)) <= 12
    batch = memory.Size("M", "batch_size", value=64, minimum=16, step=8)
    assert memory.largest_fitting(batch, lambda v: v, 47) == 40  # multiples of the device count only
    assert memory.largest_fitting(memory.Size("K", "k", value=2, minimum=2), lambda v: v, 100) is None


def test_device_memory_is_bytes_limit_on_accelerators_and_available_ram_on_cpu():
    gpus = [types.SimpleNamespace(platform="gpu", memory_stats=lambda b=b: {"bytes_limit": b, "bytes_in_use": 5})
            for b in (16 << 30, 15 << 30)]
    assert memory.device_memory(gpus) == memory.Memory(15 << 30, "GPU memory per device (bytes_limit)")
    cpu = memory.device_memory(jax.local_devices())
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert cpu.shared_by == jax.local_device_count() == 8
    assert abs(cpu.bytes - available) < 2**30 and "MemAvailable, shared by 8 CPU devices" in cpu.what


def test_out_of_memory_at_run_time_is_one_message():
    exhausted = jax.jit(lambda x: jnp.full((2**42,), x))  # 16 TiB: XLA's allocation fails
    checked = memory.CheckedStep(exhausted, lambda error: f"advice after {error}")
    with pytest.raises(OutOfMemoryError, match=r"^advice after RESOURCE_EXHAUSTED: Out of memory allocating "
                                               r"17592186044416 bytes\.$"):
        checked(1.0)
    with pytest.raises(TypeError):  # other errors pass through
        memory.CheckedStep(lambda x: x + "a", str)(1.0)


def fake_lower(overrides, k=6, m=32):
    """A lowering whose executable's analysis is 1000 + 10 K M + K (K - 1) M bytes."""
    k, m = overrides.get("k", k), overrides.get("batch_size", m)
    analysis = types.SimpleNamespace(
        argument_size_in_bytes=1000, output_size_in_bytes=500, alias_size_in_bytes=500, generated_code_size_in_bytes=0,
        temp_size_in_bytes=10 * k * m + k * (k - 1) * m)
    return types.SimpleNamespace(compile=lambda *options: types.SimpleNamespace(memory_analysis=lambda: analysis))


def test_out_of_memory_at_run_time_advises_smaller_steps_than_the_one_that_ran():
    sizes = [memory.Size("K", "k", 6, minimum=2, degree=2), memory.Size("M", "batch_size", 32, minimum=16, step=8)]
    checked = memory.compile_checked(fake_lower, sizes, devices=jax.local_devices(),
                                     memory=memory.Memory(10**6, "the test's limit"))
    checked._compiled = jax.jit(lambda x: jnp.full((2**42,), x))
    with pytest.raises(OutOfMemoryError) as error:
        checked(1.0)
    message = str(error.value)
    assert message.startswith("Out of memory while the train step (K=6, M=32) ran: RESOURCE_EXHAUSTED: Out of memory")
    assert "\n" not in message
    assert "K: k=5 (needs" in message and "M: batch_size=24 (needs" in message


def test_pretraining_compiles_the_step_once_and_runs_that_executable(tmp_path, monkeypatch, fast_compile, caplog):
    caplog.set_level("INFO")
    made = []
    real = parallel_train_step

    def counted(**options):
        pmapped = real(**options)
        spy = types.SimpleNamespace(lowered=0, called=0)
        made.append(spy)

        class Spied:
            def lower(self, *args):
                spy.lowered += 1
                return pmapped.lower(*args)

            def __call__(self, *args):
                spy.called += 1
                return pmapped(*args)

        return Spied()

    monkeypatch.setattr(train, "parallel_train_step", counted)
    config = tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=3, **{"model.backbone": "conv4"})
    with mocked_tfds(tmp_path / "tfds", 64):
        state = train.pretrain(config, str(tmp_path / "run"))
    assert int(state.step) == 3
    # Lowered once for the check and run as that executable: calling the pmapped step
    # would compile it again.
    assert [(spy.lowered, spy.called) for spy in made] == [(1, 0)]
    assert re.search(r"The train step needs 8 x [\d.]+ MiB = [\d.]+ MiB of [\d.]+ GiB \(available host RAM "
                     r"\(MemAvailable, shared by 8 CPU devices\); XLA's memory analysis", caplog.text)


def test_a_step_whose_compile_runs_out_of_memory_is_one_message_with_advice(step):
    """XLA:GPU allocates while it autotunes, so a step far too large fails to compile:
    that is the same one message, and the advice counts such sizes as not fitting."""
    limit = 10 * need_at(step)

    def lower(overrides):  # K > 4 does not even compile, like K=2000 on a GPU
        lowered = step.lower(overrides)

        def compile(*options):
            if overrides.get("relational.num_views", 6) > 4:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 244.03GiB")
            return lowered.compile(*options)

        return types.SimpleNamespace(compile=compile)

    with pytest.raises(OutOfMemoryError) as error:
        memory.compile_checked(lower, step.sizes, devices=jax.local_devices(), memory=memory.Memory(limit, "the test's limit"))
    message = str(error.value)
    assert message.startswith("The train step (K=6, M=32) does not fit: compiling it ran out of device memory "
                              "(RESOURCE_EXHAUSTED: Out of memory while trying to allocate 244.03GiB).")
    assert f"K: relational.num_views=4 (needs {memory._size(need_at(step, 'relational.num_views', 4))})" in message
    assert "M: none, not even batch_size=16" in message  # at K=6 no M compiles
