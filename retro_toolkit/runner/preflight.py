"""Input checks that need the file system, run before anything is written.

Schema checks live in recipe/validate.py; these look at the files the recipe's stages
will read (each stage's `preflight` and `reads`, retro_toolkit/stages/), so `retro-run validate` and a real run fail the same way, up front.
`check_inputs` holds for every run, dry runs included; `check_launch` is what a real run
needs of this machine and cluster (a usable work directory, Slurm's tools, container mounts).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from retro_toolkit.errors import UserError
from retro_toolkit.executors import for_stage
from retro_toolkit.stages import STAGES


def check_inputs(recipe: DictConfig) -> None:
    """Each stage's own file checks (its `preflight`), in pipeline order."""
    for spec in STAGES.values():
        if spec.name in recipe.stages and spec.preflight is not None:
            spec.preflight(recipe)


def check_launch(recipe: DictConfig, *, need_scheduler: bool = True, stages: list[str] | None = None) -> None:
    """What a real (not dry) run needs before its work directory is created: a work directory
    it can create or write, Slurm's tools when it submits from here (`need_scheduler`) and
    enough nodes that take jobs for the `stages` that will run (all by default), and every
    path its jobs use inside the container's mounts when the jobs run in a container."""
    check_workdir(recipe.workdir)
    if recipe.executor.type == "slurm" and need_scheduler:
        _check_slurm_tools(recipe.executor)
        if recipe.executor.tunnel.type == "local":  # through ssh, sinfo is the login node's
            from retro_toolkit.runner.slurm_nodes import check_nodes

            check_nodes([(s, for_stage(recipe.executor, s)) for s in (recipe.stages if stages is None else stages)])
    _check_container_paths(recipe)


def check_workdir(workdir: str) -> None:
    """An existing work directory must be a writable folder; a new one needs a writable parent."""
    p = Path(workdir)
    fix = "Set workdir=... to a folder you can write (in the recipe or on the command line)."
    # os.path's tests answer False where the path cannot even be looked at (a folder above
    # it this user cannot enter); the walk up then names that folder.
    if os.path.islink(p) and not os.path.exists(p):
        raise UserError(f"workdir {p} is a symbolic link to {os.readlink(p)}, which does not exist. "
                        f"Create its target or remove the link. {fix}")
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise UserError(f"workdir {p} exists and is a file, not a folder; the run would not overwrite it. {fix}")
        if not _writable(p):
            raise UserError(f"workdir {p} is a folder this user cannot write. {fix}")
        return
    parent = p.parent
    while not os.path.exists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.path.isdir(parent):
        raise UserError(f"workdir {p} cannot be created: {parent} is a file, not a folder. {fix}")
    if not _writable(parent):
        raise UserError(f"workdir {p} cannot be created: its nearest existing parent {parent} is not writable "
                        f"by this user. {fix}")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _check_slurm_tools(executor: DictConfig) -> None:
    if executor.tunnel.type == "ssh":
        if not executor.tunnel.host:
            raise UserError("executor.tunnel.type is ssh but executor.tunnel.host is not set: name the cluster's "
                            "login node (executor.tunnel.host=login.example.com), or use executor.tunnel.type=local "
                            "on the login node itself.")
        return
    missing = [tool for tool in ("sbatch", "sacct") if shutil.which(tool) is None]
    if missing:
        raise UserError(
            f"executor.type is slurm with a local tunnel, so jobs are submitted from this machine, but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH. Run retro-run on a login "
            "node of the cluster, or submit through ssh (executor.tunnel.type=ssh executor.tunnel.host=LOGIN_NODE); "
            "`retro-run RECIPE --dry-run` prints the sbatch scripts without Slurm."
        )


@dataclass(frozen=True)
class _Mount:
    host: Path
    container: str
    spec: str


def _parse_mounts(specs: list[str]) -> list[_Mount]:
    """`host:container[:options]` (Pyxis; a lone path mounts it at the same path). Docker's
    `-v host:container[:options]` has the same shape."""
    mounts = []
    for spec in specs:
        for part in str(spec).split(","):
            fields = part.strip().split(":")
            if not fields[0]:
                continue
            host = fields[0]
            container = fields[1] if len(fields) > 1 and fields[1] else host
            mounts.append(_Mount(Path(os.path.expanduser(host)).resolve(), os.path.normpath(container), part))
    return mounts


def _stage_mounts(recipe: DictConfig, stage: str) -> tuple[str, list[_Mount]] | None:
    """(image, mounts) when the stage's jobs run in a container, else None."""
    ex = for_stage(recipe.executor, stage)
    if ex.type == "slurm" and ex.get("container_image"):
        return ex.container_image, _parse_mounts(list(ex.container_mounts))
    if ex.type == "docker":
        # executors/docker.py always mounts the work directory at its own path.
        return ex.container_image, _parse_mounts([f"{recipe.workdir}:{recipe.workdir}", *ex.volumes])
    return None


def _is_path(value: str | None) -> bool:
    return bool(value) and not str(value).startswith("builtin:")


def _stage_paths(recipe: DictConfig, stage: str) -> list[tuple[str, str]]:
    """(key, path) of every file or folder a stage's job reads or writes (builtin: ones are in
    the package, which the image holds)."""
    spec = STAGES[stage]
    out = [("workdir", recipe.workdir), *((f"paths.{name}", value) for name, value in recipe.paths.items())]
    out += spec.reads(recipe) if spec.reads is not None else []
    return [(key, str(value)) for key, value in out if _is_path(value)]


def _check_container_paths(recipe: DictConfig) -> None:
    for stage in recipe.stages:
        container = _stage_mounts(recipe, stage)
        if container is None:
            continue
        image, mounts = container
        for key, path in _stage_paths(recipe, stage):
            _check_mounted(key, path, stage, image, mounts)


def _check_mounted(key: str, path: str, stage: str, image: str, mounts: list[_Mount]) -> None:
    """The job reads `path` at that very path inside the container: some mount must bring the
    host's copy there, i.e. cover it on the host side and place it at the same path."""
    named = Path(os.path.abspath(os.path.expanduser(path)))
    real = named.resolve()
    shown = ", ".join(m.spec for m in mounts) or "none"
    near = [m for m in mounts if real.is_relative_to(m.host)]
    for m in near:
        inside = Path(m.container) / real.relative_to(m.host)
        if inside in (named, real):
            return
    where = f"stage {stage} runs in container {image}"
    if near:
        m = near[0]
        raise UserError(
            f"recipe key '{key}' = {path}: {where}, and the mount {m.spec} puts it at "
            f"{Path(m.container) / real.relative_to(m.host)} inside, but the job opens {named}. Mount it at the "
            f"same path (e.g. {m.host}:{m.host}) in executor.container_mounts."
        )
    raise UserError(
        f"recipe key '{key}' = {path} lies outside every container mount ({where}; mounts: {shown}), so the "
        f"job cannot see it. Add a mount of a folder holding it at the same path (e.g. {_top(real)}:{_top(real)}) "
        "to executor.container_mounts (executor.volumes for docker), or move it under a mounted folder."
    )


def _top(p: Path) -> str:
    """The first two levels of a path, a likely shared file system root (e.g. /lustre/project)."""
    return str(Path(*p.parts[:3])) if len(p.parts) > 2 else str(p)
