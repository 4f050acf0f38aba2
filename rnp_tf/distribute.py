"""`tf.distribute` strategies for `rnp_tf.train`: one device, many GPUs, many machines, TPUs.

`get_strategy(name)` builds the strategy a `--strategy` flag names:

| name | strategy | replicas |
| --- | --- | --- |
| `default` | `tf.distribute.get_strategy()` (no distribution) | 1 |
| `mirrored` | `MirroredStrategy` over every local GPU (no GPU: every logical CPU device) | local devices |
| `multi_worker` | `MultiWorkerMirroredStrategy`, cluster from the `TF_CONFIG` environment variable | workers x local devices |
| `tpu` | `TPUStrategy` through `TPUClusterResolver(tpu=...)` | TPU cores |

Build the strategy before anything else touches TensorFlow's runtime
(`MultiWorkerMirroredStrategy` and `TPUStrategy` must configure it), then
build and compile the model inside `strategy.scope()`. The batch size of
`rnp_tf.train` is the *global* batch: `tf.data` yields global batches and
Keras splits each one across the replicas.

Keras 3 (3.15) `Model.fit` does not work under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585): its symbolic build reduces a data batch with
`strategy.reduce` (a nested `PerReplica` it cannot convert) and it reduces
the step's scalar logs with `axis=0`. `adapt_model` replaces both for
multi-worker runs (see there).

Example:

    strategy = get_strategy("mirrored")
    with strategy.scope():
        model = RNPModel(...)
        model.compile(...)
    adapt_model(model, strategy)
"""

import dataclasses
import json
import os

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

_TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)


def configure_cpu_devices(count):
    """Splits the CPU into `count` logical devices (before TensorFlow starts).

    For running `MirroredStrategy` without accelerators, e.g. in tests: two
    logical CPUs give two replicas. Must run before TensorFlow initialises
    its runtime (before any op or dataset is created).

    Args:
        count: number of logical CPU devices, >= 1.

    Raises:
        ValueError: if the runtime already started with another layout.

    Example:

    >>> configure_cpu_devices(2)  # then get_strategy("mirrored") has 2 replicas
    """
    import tensorflow as tf

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"--cpu_devices must be a positive integer. Received: {count!r}")
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == count:
        return
    if count == 1 and current is None:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise ValueError(
            f"--cpu_devices={count}: TensorFlow's runtime is already initialised "
            f"({len(tf.config.list_logical_devices('CPU'))} logical CPU devices); set it before anything else ({error})."
        )


def read_tf_config(environ=None):
    """Parses and checks the `TF_CONFIG` environment variable.

    Args:
        environ: mapping to read from (default `os.environ`).

    Returns:
        The decoded dict (`cluster`, `task`).

    Raises:
        ValueError: one line saying what is missing or wrong.

    Example:

    >>> read_tf_config({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'})
    {'cluster': {'worker': ['a:1']}, 'task': {'type': 'worker', 'index': 0}}
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise ValueError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable (the cluster and this "
            f"process's task), e.g. {_TF_CONFIG_EXAMPLE}; set it on every worker."
        )
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}); expected e.g. {_TF_CONFIG_EXAMPLE}.")
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object; expected e.g. {_TF_CONFIG_EXAMPLE}.")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not any(cluster.get(k) for k in ("worker", "chief")):
        raise ValueError(f"TF_CONFIG has no 'cluster' with 'worker' (or 'chief') addresses; expected e.g. {_TF_CONFIG_EXAMPLE}.")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise ValueError(f"TF_CONFIG cluster[{job!r}] must be a list of 'host:port' strings. Received: {addresses!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f"TF_CONFIG has no 'task' with 'type' and 'index'; expected e.g. {_TF_CONFIG_EXAMPLE}.")
    job, index = task["type"], task["index"]
    if job not in cluster:
        raise ValueError(f"TF_CONFIG task type {job!r} is not a job of the cluster ({', '.join(cluster)}).")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[job]):
        raise ValueError(
            f"TF_CONFIG task index {index!r} is out of range: cluster[{job!r}] has {len(cluster[job])} addresses."
        )
    return config


def _local_tpu_available():
    return any(os.path.exists(f"/dev/accel{i}") for i in range(8)) or os.path.isdir("/dev/vfio")


_MIRRORED = {}


def get_strategy(name, tpu=None):
    """The `tf.distribute.Strategy` a `--strategy` flag names.

    Args:
        name: one of `STRATEGIES`.
        tpu: for `"tpu"`: the TPU's name or `grpc://` address; None uses a
            TPU attached to this machine (Cloud TPU VM) or `$TPU_NAME`.

    Returns:
        A strategy. Build and compile the model inside its `scope()`.
        `"mirrored"` returns the same strategy object on every call in a
        process (see the comment in the code).

    Raises:
        ValueError: one line naming the problem (unknown name, no TF_CONFIG,
            no TPU, ...).

    Example:

    >>> strategy = get_strategy("mirrored")
    >>> strategy.num_replicas_in_sync
    2
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}. Received: {name!r}")
    if tpu and name != "tpu":
        raise ValueError(f"--tpu={tpu!r} is only used with --strategy=tpu. Received: --strategy={name}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = tuple(d.name for d in (gpus or tf.config.list_logical_devices("CPU")))
        # One strategy per device set and process: the collective ops of two
        # MirroredStrategy objects over the same devices draw the same
        # instance keys, and a second run in the process then fails with
        # "Shape mismatch in the collective instance" (measured, TF 2.21).
        if devices not in _MIRRORED:
            _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))
        return _MIRRORED[devices]
    if name == "multi_worker":
        read_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    address = tpu or os.environ.get("TPU_NAME") or ("local" if _local_tpu_available() else None)
    if address is None:
        raise ValueError(
            "--strategy=tpu: no TPU attached to this machine and no --tpu address (or $TPU_NAME); pass "
            "--tpu=NAME_OR_grpc://HOST:8470."
        )
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--strategy=tpu: cannot use the TPU {address!r} ({message}).")


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """Where this process stands in a (multi-worker) run.

    Attributes:
        num_workers: worker processes taking part.
        index: this worker's index (0 for single-process strategies).
        is_chief: whether this process writes the run's outputs.
    """

    num_workers: int
    index: int
    is_chief: bool


def task_info(strategy):
    """The `TaskInfo` of this process under `strategy`.

    The chief is the `chief` task when the cluster has one, else worker 0;
    single-process strategies are always the chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multi_worker(strategy) or resolver is None:
        return TaskInfo(1, 0, True)
    spec = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    workers = sum(len(spec.get(job, [])) for job in ("chief", "worker"))
    if "chief" in spec:
        chief = task_type == "chief"
        index = 0 if chief else task_id + len(spec["chief"])
    else:
        chief = task_type == "worker" and task_id == 0
        index = task_id
    return TaskInfo(workers, index, chief)


def is_multi_worker(strategy):
    """True for `MultiWorkerMirroredStrategy` (collective all-reduce across processes)."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


def is_tpu(strategy):
    import tensorflow as tf

    return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


def adapt_model(model, strategy):
    """Lets `model.fit` run under `MultiWorkerMirroredStrategy` (Keras 3.15).

    Two replacements, on this model instance only and only for multi-worker
    strategies (a no-op otherwise):

    - `_maybe_symbolic_build`: Keras pulls one batch and `strategy.reduce`s
      it to build the model symbolically, which fails for a nested
      `PerReplica` under multi-worker collectives. Every weight of an
      `RNPModel` exists after `__init__` and `compile`, so it is skipped.
    - `_make_function`: Keras reduces each step's scalar logs with
      `strategy.reduce("MEAN", v, axis=0)` (invalid for a scalar). Here a
      step is one compiled function, `strategy.run(step)` then a mean over
      the replicas with `axis=None`; end of data is detected with
      `get_next_as_optional`, which all workers agree on. The epoch logs
      Keras reports come from the metrics themselves, read in cross-replica
      context (summed over every replica).

    Args:
        model: a compiled `keras.Model` built inside `strategy.scope()`.
        strategy: its strategy.

    Returns:
        The model.
    """
    if not is_multi_worker(strategy):
        return model
    import tensorflow as tf

    if getattr(model, "steps_per_execution", 1) != 1:
        raise ValueError("--strategy=multi_worker runs one step per execution (steps_per_execution=1).")

    def make_function(step_function):
        @tf.function(reduce_retracing=True)
        def on_data(data):
            outputs = strategy.run(step_function, args=(data,))
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), outputs)

        def function(iterator):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                raise StopIteration
            return on_data(optional.get_value())

        return function

    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    model._make_function = make_function
    model.train_function = None
    model.test_function = None
    return model


def distribute_options(strategy, in_memory):
    """`tf.data.Options` for the training input under `strategy`.

    Multi-worker runs shard in-memory datasets (digits, npz) by element
    (`DATA`: each worker keeps its share of every global batch) and file
    datasets (tfds) with TensorFlow's default (`AUTO`: by file when there
    are enough files, so each worker reads and decodes only its own).
    """
    import tensorflow as tf

    options = tf.data.Options()
    if is_multi_worker(strategy):
        policy = tf.data.experimental.AutoShardPolicy
        options.experimental_distribute.auto_shard_policy = policy.DATA if in_memory else policy.AUTO
    return options
