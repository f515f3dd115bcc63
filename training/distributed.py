"""Multi-worker training (`--distributed`): one global batch split across workers, one writer.

Follows TensorFlow's "Multi-worker training with Keras" guide: every worker runs the same script
with its own `TF_CONFIG` (the cluster's worker addresses and its own task); the
`MultiWorkerMirroredStrategy` keeps a copy of the model per worker and all-reduces the gradients
each step. Every worker runs the whole script (a worker that stopped early could leave the others
waiting in a collective), but only the chief (worker 0, or a "chief" task) writes the artifact:
the others write theirs to a temporary directory they delete (the guide's `write_filepath`).

Same results as one process with the same `--batch-size` and seed:
- every worker builds the same seeded, shuffled, augmented pipeline of global batches; `fit`
  splits each global batch into per-worker slices (auto-shard policy DATA), so together the
  workers see exactly the images of the single-process run, in the same order;
- BatchNorm normalises with statistics over the whole global batch (`synchronized=True`);
- the loss is averaged over the global batch (Keras scales by the number of replicas).
What differs: float sums in another order (~1e-6 relative), and dropout masks (each worker
draws from the same seed stream, so its slice's masks are not the single run's).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from commandline import UsageError


def unsupported_options(config) -> list[str]:
    """The flags of `config` that multi-worker training refuses, rather than silently changing them.

    Lookahead reads and overwrites the weights from Python between steps, Muon's update is a
    custom per-variable step, and the fused and custom BatchNorms compute per-worker batch
    statistics: none of them has been checked against a single-process run under the strategy.
    """
    refused = []
    if config.optimizer == "muon":
        refused.append("--optimizer muon")
    if config.lookahead:
        refused.append("--lookahead")
    if config.batchnorm != "keras":
        refused.append(f"--batchnorm {config.batchnorm} (only keras BN synchronises batch statistics)")
    if config.mixed_precision:
        refused.append("--mixed-precision")
    return refused


def read_tf_config() -> dict:
    """TF_CONFIG, checked: the strategy's own errors on a bad one are obscure or hang."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UsageError("--distributed needs TF_CONFIG, e.g. "
                         '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
                         '"task": {"type": "worker", "index": 0}} (see docs/distributed-training.md)')
    try:
        tf_config = json.loads(raw)
        workers = tf_config["cluster"].get("worker", [])
        chiefs = tf_config["cluster"].get("chief", [])
        task_type, index = tf_config["task"]["type"], int(tf_config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"TF_CONFIG is not {{'cluster': {{...}}, 'task': {{'type', 'index'}}}}: {exc}") from None
    members = {"worker": workers, "chief": chiefs}
    if task_type not in members or not 0 <= index < len(members[task_type]):
        raise UsageError(f"TF_CONFIG task {task_type}:{index} is not in its cluster "
                         f"({len(workers)} workers, {len(chiefs)} chief)")
    return tf_config


def multi_worker_strategy():
    """The strategy from TF_CONFIG; create it before any other TensorFlow op runs."""
    import tensorflow as tf

    read_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy) -> bool:
    """The guide's rule: the "chief" task, else worker 0 (no chief in the cluster)."""
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type is None or task_type == "chief" or (task_type == "worker" and task_id == 0)


def shard_by_data(dataset):
    """Split each global batch across workers by element (no files to shard by)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@contextmanager
def write_path(output: str | os.PathLike, chief: bool):
    """Where this worker writes the artifact: `output` on the chief; elsewhere a temporary
    directory that is deleted afterwards, so a shared --output volume gets one artifact."""
    if chief:
        yield Path(output)
        return
    scratch = Path(tempfile.mkdtemp(prefix="calib-train-worker-"))
    try:
        yield scratch / Path(output).name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)



def adapt_fit_to_multi_worker(model) -> None:
    """Let Keras 3's TensorFlow `fit` run under MultiWorkerMirroredStrategy (checked on Keras 3.15).

    Two steps of Keras's TensorFlow trainer fail with this strategy, both by handing a value
    to `strategy.reduce` that its collective all-reduce cannot take (MirroredStrategy can):
    - before training, `fit` builds the model, loss and metrics from one batch
      (`_maybe_symbolic_build`) and merges that batch's `PerReplica` values with
      `strategy.reduce("MEAN", batch, axis=None)` on the whole (images, labels) tuple, which fails
      with "Attempt to convert a value (PerReplica:{...}) ... to a Tensor". Only the shapes and
      dtypes matter, so the override below builds from the dataset's element_spec instead. It
      must not draw a batch either: Keras then restarts the iterator, and our pipeline
      reshuffles on every new iteration (reshuffle_each_iteration), so training would start
      on the second shuffle, not the single-process run's first (measured: step-0 loss 2.429
      instead of 2.390);
    - after each train or test step, the scalar loss and metric results are merged with
      `strategy.reduce("MEAN", value, axis=0)` ("Invalid reduction dimension 0 for input with
      0 dimensions"). The steps below return each scalar as a 1-element vector, so that
      reduction averages the workers' results (each worker's over equally many images) into
      one scalar again, as a single process would log it.
    Both are instance overrides of private Keras methods; a Keras without them fails loudly here.
    """
    from keras.src import tree
    import tensorflow as tf

    missing = [name for name in ("_maybe_symbolic_build", "_symbolic_build", "train_step", "test_step")
               if not hasattr(model, name)]
    if missing:
        raise RuntimeError(f"this Keras has no Trainer.{', '.join(missing)}: check whether its fit "
                           "still needs training.distributed.adapt_fit_to_multi_worker")
    strategy = model.distribute_strategy

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:   # shapes and dtypes only: a TensorSpec has both
            data_batch = iterator.data_adapter.get_tf_dataset().element_spec
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    def as_vectors(step):
        def step_returning_vectors(data):
            return tree.map_structure(
                lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v, step(data))
        return step_returning_vectors

    model._maybe_symbolic_build = maybe_symbolic_build
    if strategy.extended._in_multi_worker_mode():   # Keras's condition for the axis=0 reduction
        model.train_step = as_vectors(model.train_step)
        model.test_step = as_vectors(model.test_step)
