"""Data parallelism with ``jax.jit`` + shardings: a 1-D ``'data'`` mesh over every device.

The batch is split along ``'data'``; parameters, optimizer state and BatchNorm statistics
are replicated. The compiler inserts the cross-device reductions, so BatchNorm statistics of
trainable layers and the gradients are over the *global* batch, with no ``pmap``,
``pmean`` or ``axis_name``. One device is the mesh of size one; several processes (multi-host)
each feed their own share of every global batch.

Checkpoints hold plain arrays, not device layouts: restore them against
:func:`abstract_replicated` of the *current* mesh, so that a run saved on N devices (or
processes) resumes on M.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxcnn.config import ConfigError

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``'data'`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches stacked along a leading steps axis: axis 1 (the batch) split over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh`` (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def abstract_replicated(tree: Any, mesh: Mesh) -> Any:
    """``ShapeDtypeStruct`` leaves replicated over ``mesh``: an Orbax restore target.

    Restoring against the saved arrays' own shardings fails or misplaces them when the
    device count changed since the save (orbax#648); this target re-lays them out on the
    current mesh.
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated(mesh)), tree
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host (or single-device) values as arrays replicated over ``mesh``.

    A jitted step compiles once per input layout: fed a freshly built, uncommitted state
    and then its own replicated output, it compiles twice; placing the state first makes
    that once. Works across processes when every process passes the same values (as the
    seeded initialisation does); leaves already replicated over ``mesh`` are kept.
    """
    target = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == target:
            return x
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

    return jax.tree.map(put, tree)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises a one-line ConfigError unless the global batch divides over the devices."""
    devices = mesh.devices.size
    if batch_size % devices:
        lower = batch_size - batch_size % devices
        raise ConfigError(
            f"--batch-size {batch_size} does not divide over {devices} devices; use a multiple "
            f"of {devices} (e.g. {lower or devices} or {lower + devices})"
        )


def to_global(
    batch: Mapping[str, np.ndarray], mesh: Mesh, *, stacked: bool = False
) -> dict[str, jax.Array]:
    """Turns this process's share of a batch into global arrays sharded over ``'data'``.

    ``stacked``: the arrays are batches stacked along a leading steps axis
    (``[steps, batch, ...]``, see ``train.run_epoch_in_memory``), split along axis 1.
    """
    sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def initialize_distributed(**kwargs: Any) -> None:
    """``jax.distributed.initialize`` that also reads ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``.

    JAX 0.10 reads only ``JAX_COORDINATOR_ADDRESS`` (and ``JAX_COORDINATOR_PORT``,
    ``JAX_LOCAL_DEVICE_IDS``) itself; the process count and id come from a detected cluster
    (SLURM, Open MPI, Cloud TPU, Kubernetes, ...) or from arguments. Reading the two
    variables here makes a hand-launched cluster (or a test on one machine) work with
    environment variables alone. CPU processes use gloo collectives (JAX's default).

    Args:
      **kwargs: passed on to ``jax.distributed.initialize``; they win over the variables.
    """
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = os.environ.get(name)
        if key not in kwargs and value:
            if not value.strip().isdigit():
                raise ConfigError(f"{name}={value!r} is invalid; allowed: an integer >= 0")
            kwargs[key] = int(value)
    jax.distributed.initialize(**kwargs)
