"""Data parallelism with ``jax.jit`` + shardings: a 1-D ``'data'`` mesh over every device.

The batch is split along ``'data'``; parameters, optimizer state and BatchNorm statistics
are replicated. The compiler inserts the cross-device reductions, so BatchNorm statistics of
trainable layers and the gradients are over the *global* batch, with no ``pmap``,
``pmean`` or ``axis_name``. One device is the mesh of size one; several processes (multi-host)
each feed their own share of every global batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``'data'`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises a one-line ValueError unless the global batch divides over the devices."""
    devices = mesh.devices.size
    if batch_size % devices:
        lower = batch_size - batch_size % devices
        raise ValueError(
            f"--batch-size {batch_size} does not divide over {devices} devices; use a multiple "
            f"of {devices} (e.g. {lower or devices} or {lower + devices})"
        )


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's share of a batch into global arrays sharded over ``'data'``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
