"""Device meshes over the axes ``data, fsdp, expert, context, tensor``, on one host or many.

``MeshConfig`` gives a size per axis (``-1``: all the devices the other axes leave); ``make_mesh`` builds
the ``jax.sharding.Mesh`` (Auto axes: GSPMD/Shardy propagation plus ``sharding.rules.constrain`` hints;
``jax.shard_map`` only for the MoE dispatch and the context-parallel attention). Multi-slice / multi-
node meshes put ``dcn_*`` factors on the slow network (``mesh_utils.create_hybrid_device_mesh``).

Axis order, outermost first: ``data, fsdp, expert, context, tensor``. ``tensor`` is innermost so its
per-layer all-reduces stay on the fastest links (NVLink / ICI neighbours); ``data`` is outermost and is
where cross-slice (DCN) parallelism goes by default.

Multi-host: call :func:`initialize_distributed` once per process, before any other JAX call; every
process then builds the same global mesh with :func:`make_mesh`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

log = logging.getLogger(__name__)

AXES: tuple[str, ...] = ("data", "fsdp", "expert", "context", "tensor")
"""Mesh axis names, outermost first."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. Exactly one axis may be ``-1`` (all remaining devices).

    ``dcn_*`` are the factors of each axis that span slices / nodes (the slow network); the ``data``
    etc. sizes are the *total* sizes, so ``data=4, dcn_data=2`` means 2 slices x 2-way data inside a
    slice. Leave the ``dcn_*`` at 1 on a single slice or node.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    context: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_context: int = 1
    dcn_tensor: int = 1

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}

    def dcn_sizes(self) -> dict[str, int]:
        return {a: getattr(self, "dcn_" + a) for a in AXES}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete sizes for ``num_devices`` devices (fills the ``-1`` axis); raises on a mismatch."""
        sizes = self.sizes()
        for a, s in sizes.items():
            if not (isinstance(s, int) and (s == -1 or s >= 1)):
                raise ValueError(f"MeshConfig.{a} = {s!r}: expected a positive integer or -1")
            d = getattr(self, "dcn_" + a)
            if not (isinstance(d, int) and d >= 1):
                raise ValueError(f"MeshConfig.dcn_{a} = {d!r}: expected a positive integer")
        fill = [a for a, s in sizes.items() if s == -1]
        if len(fill) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1; got {fill}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if fill:
            if num_devices % fixed:
                raise ValueError(f"MeshConfig: {num_devices} devices are not divisible by the fixed axes "
                                 f"{ {a: s for a, s in sizes.items() if s != -1} } (product {fixed})")
            sizes[fill[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(f"MeshConfig: axis sizes {sizes} multiply to {fixed}, but there are "
                             f"{num_devices} devices (use -1 on one axis to fill)")
        for a, s in sizes.items():
            d = getattr(self, "dcn_" + a)
            if s % d:
                raise ValueError(f"MeshConfig.dcn_{a} = {d} does not divide {a} = {s}")
        return sizes

    @classmethod
    def from_string(cls, spec: str) -> "MeshConfig":
        """``"data=2,fsdp=-1,tensor=2"`` -> ``MeshConfig`` (for command lines)."""
        kw = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise ValueError(f"MeshConfig.from_string: {part!r} is not 'axis=size'")
            k, v = part.split("=", 1)
            k = k.strip()
            if k not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"MeshConfig.from_string: unknown axis {k!r}; expected one of "
                                 f"{[f.name for f in dataclasses.fields(cls)]}")
            kw[k] = int(v)
        if "fsdp" not in kw and -1 in kw.values():
            kw["fsdp"] = 1
        return cls(**kw)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None, *,
              axis_type: AxisType = AxisType.Auto) -> Mesh:
    """The global mesh for ``config`` over ``devices`` (default: all devices of all processes).

    All five axes are always present (size 1 when unused), so the rules table never has to ask
    whether an axis exists. ``axis_type`` defaults to ``Auto`` (sharding propagation with
    ``constrain`` hints); the model code is written for Auto axes.
    """
    config = MeshConfig() if config is None else config
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    types = (axis_type,) * len(AXES)
    dcn = config.dcn_sizes()
    if all(d == 1 for d in dcn.values()):
        if devices == list(jax.devices()) or len(devices) == jax.device_count():
            try:
                return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
            except Exception as e:  # topology-aware placement failed (e.g. an odd subset): plain order
                log.info("jax.make_mesh failed (%s); using the device order as given", e)
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=types)
    from jax.experimental import mesh_utils

    dcn_shape = tuple(dcn[a] for a in AXES)
    ici_shape = tuple(s // d for s, d in zip(shape, dcn_shape))
    arr = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices,
                                               allow_split_physical_axes=True)
    return Mesh(arr, AXES, axis_types=types)


def mesh_sizes(mesh) -> dict[str, int]:
    """``{axis: size}`` of a Mesh or AbstractMesh (axes it lacks count as 1)."""
    shape = dict(mesh.shape) if mesh is not None else {}
    return {a: int(shape.get(a, 1)) for a in AXES}


# ---------------------------------------------------------------------------------------- multi-host
_ENV_COORD = ("M1_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_ENV_NPROC = ("M1_NUM_PROCESSES", "JAX_NUM_PROCESSES", "NUM_PROCESSES")
_ENV_PID = ("M1_PROCESS_ID", "JAX_PROCESS_ID", "PROCESS_ID")


def _env(names: Sequence[str]) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return v
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                           *, auto_detect: bool | None = None, **kwargs) -> bool:
    """Start ``jax.distributed`` (call once per process, before anything else touches JAX devices).

    Explicit arguments win; otherwise ``M1_``/``JAX_``-prefixed ``COORDINATOR_ADDRESS``,
    ``NUM_PROCESSES``, ``PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``) are read. Without any of
    them, ``auto_detect=True`` (the default when a cluster environment is recognised: TPU pods,
    Slurm, Open MPI) lets JAX detect the cluster. A single process with nothing configured is a no-op.

    Returns True if this call (or an earlier one) initialised a multi-process runtime.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or _env(_ENV_COORD)
    if num_processes is None and (v := _env(_ENV_NPROC)) is not None:
        num_processes = int(v)
    if process_id is None and (v := _env(_ENV_PID)) is not None:
        process_id = int(v)
    explicit = coordinator_address is not None
    if auto_detect is None:
        auto_detect = any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                                                    "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_ID"))
    if not explicit and not auto_detect:
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("initialize_distributed: a coordinator address needs num_processes and process_id "
                         "(arguments or M1_/JAX_NUM_PROCESSES and M1_/JAX_PROCESS_ID)")
    if explicit and num_processes == 1:
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids, **kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


__all__ = ["AXES", "MeshConfig", "make_mesh", "mesh_sizes", "initialize_distributed"]
