"""Where a recipe runs: compute profiles kept apart from recipes.

A profile is one of

``{"cluster": {"type": "distributed.LocalCluster", "kwargs": {...}, "scale": {...}}}``
    a cluster sphx starts and owns (closed when the run ends); ``type`` is any dotted
    class path with the ``distributed`` ``Cluster`` interface (``dask_jobqueue.SLURMCluster``,
    ``dask_gateway.GatewayCluster``...); ``scale`` is passed to ``cluster.scale``
    (``{"jobs": 8}`` for SLURM);
``{"address": "tcp://host:8786"}`` or ``{"scheduler_file": "path.json"}``
    an existing scheduler (never closed by sphx);
``{"scheduler": "threads" | "processes" | "synchronous"}``
    dask's local schedulers, no distributed cluster.

Built-in profiles: ``local`` (the default: a ``LocalCluster`` sized to the machine),
``threads``, ``synchronous`` and ``slurm`` (``SLURMCluster`` with the defaults of the
user's dask-jobqueue configuration, one job). Users add or override profiles in a YAML
file with a top-level ``profiles:`` mapping, found at ``$SPHX_COMPUTE_CONFIG`` or
``~/.config/sphx/compute.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import dask
import pydantic
import yaml

from ..errors import ComputeError

__all__ = ["BUILTIN_PROFILES", "ComputeSpec", "compute_context", "load_profiles", "make_cluster", "resolve_compute"]


class ClusterSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    type: str = "distributed.LocalCluster"
    kwargs: dict[str, Any] = pydantic.Field(default_factory=dict)
    scale: dict[str, int] | None = None


class ComputeSpec(pydantic.BaseModel):
    """One way of running dask graphs (see the module docstring)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    scheduler: Literal["distributed", "threads", "processes", "synchronous"] = "distributed"
    address: str | None = None
    scheduler_file: str | None = None
    cluster: ClusterSpec | None = None

    @pydantic.model_validator(mode="after")
    def _one_target(self) -> ComputeSpec:
        targets = [t for t in ("address", "scheduler_file", "cluster") if getattr(self, t) is not None]
        if len(targets) > 1:
            raise ValueError(f"give only one of address, scheduler_file and cluster (got {targets})")
        if self.scheduler != "distributed" and targets:
            raise ValueError(f"scheduler={self.scheduler!r} runs locally and takes no {targets[0]}")
        return self

    def describe(self) -> str:
        if self.scheduler != "distributed":
            return f"dask {self.scheduler} scheduler"
        if self.address:
            return f"scheduler at {self.address}"
        if self.scheduler_file:
            return f"scheduler from {self.scheduler_file}"
        cluster = self.cluster or ClusterSpec()
        return f"{cluster.type}({', '.join(f'{k}={v!r}' for k, v in cluster.kwargs.items())})"


BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "local": {"cluster": {"type": "distributed.LocalCluster"}},
    "threads": {"scheduler": "threads"},
    "synchronous": {"scheduler": "synchronous"},
    "slurm": {"cluster": {"type": "dask_jobqueue.SLURMCluster", "scale": {"jobs": 1}}},
}


def _user_config() -> Path | None:
    env = os.environ.get("SPHX_COMPUTE_CONFIG")
    if env:
        return Path(env)
    path = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "sphx" / "compute.yaml"
    return path if path.is_file() else None


def load_profiles(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """Built-in profiles updated with the user's file (``path`` or the default location)."""
    profiles = copy.deepcopy(BUILTIN_PROFILES)
    file = Path(path) if path else _user_config()
    if file is None:
        return profiles
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ComputeError(f"{file}: cannot read compute profiles: {e}") from None
    user = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(user, dict):
        raise ComputeError(f"{file}: expected a top-level 'profiles:' mapping of name -> profile")
    profiles.update(user)
    return profiles


def resolve_compute(
    *,
    profile: str | Mapping[str, Any] | None = None,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    profiles: Mapping[str, Mapping[str, Any]] | None = None,
) -> ComputeSpec:
    """The compute spec for the command-line options (default: the ``local`` profile)."""
    given = [n for n, v in (("profile", profile), ("scheduler", scheduler), ("scheduler_file", scheduler_file)) if v]
    if len(given) > 1:
        raise ComputeError(f"choose one of --profile, --scheduler and --scheduler-file (got {', '.join(given)})")
    if scheduler:
        return ComputeSpec(address=scheduler)
    if scheduler_file:
        return ComputeSpec(scheduler_file=os.fspath(scheduler_file))
    if isinstance(profile, Mapping):
        body, name = dict(profile), "<given>"
    else:
        name = profile or "local"
        known = dict(profiles) if profiles is not None else load_profiles()
        if name not in known:
            raise ComputeError(f"unknown compute profile {name!r}; known: {', '.join(known)}")
        body = dict(known[name])
    try:
        return ComputeSpec(**body)
    except pydantic.ValidationError as e:
        raise ComputeError(f"compute profile {name!r}: " + "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'profile'}: {err['msg']}" for err in e.errors())) from None


def _import(dotted: str) -> Callable[..., Any]:
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        hint = " (install sphx[slurm])" if module.startswith("dask_jobqueue") else ""
        raise ComputeError(f"cannot import cluster type {dotted!r}{hint}: {e}") from None


def make_cluster(spec: ComputeSpec):
    """Instantiate the cluster of a ``cluster`` profile (not scaled)."""
    cluster = spec.cluster or ClusterSpec()
    cls = _import(cluster.type)
    try:
        return cls(**cluster.kwargs)
    except (TypeError, ValueError) as e:
        raise ComputeError(f"cannot start {cluster.type} with {cluster.kwargs}: {e}") from None


@contextlib.contextmanager
def compute_context(spec: ComputeSpec, *, log: Callable[[str], None] = lambda s: None) -> Iterator[Any]:
    """Run the body on the target of ``spec``; yields the distributed Client (or None).

    Clusters started here are closed on exit; schedulers attached to by address or file
    are left running.
    """
    if spec.scheduler != "distributed":
        with dask.config.set(scheduler=spec.scheduler):
            log(f"compute: {spec.describe()}")
            yield None
        return
    from distributed import Client

    if spec.address or spec.scheduler_file:
        with Client(spec.address, scheduler_file=spec.scheduler_file, set_as_default=True) as client:
            log(f"compute: {spec.describe()} ({len(client.scheduler_info(n_workers=-1)['workers'])} workers)")
            log(f"dashboard: {client.dashboard_link}")
            yield client
        return
    with make_cluster(spec) as cluster:
        if spec.cluster and spec.cluster.scale:
            cluster.scale(**spec.cluster.scale)
        with Client(cluster, set_as_default=True) as client:
            log(f"compute: {spec.describe()}")
            log(f"dashboard: {client.dashboard_link}")
            yield client
