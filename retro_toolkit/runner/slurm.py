"""The sbatch script NeMo-Run would submit for a stage, without submitting it (--dry-run)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from retro_toolkit.runner import executors


def sbatch_script(recipe: DictConfig, stage: str, recipe_file: Path) -> str:
    import nemo_run as run

    # NeMo-Run writes the script into an experiment folder: make that a throwaway one
    # so a dry run leaves nothing behind (the script's own paths still point at the
    # work directory, where a real run puts them).
    scratch = tempfile.mkdtemp(prefix="retro-dryrun-")
    try:
        with run.Experiment(f"{recipe.name}-{stage}", base_dir=scratch, clean_mode=True) as exp:
            exp.add(executors.script(recipe.executor, stage, recipe_file),
                    executor=executors.build(recipe.executor, recipe), name=stage)
            exp.dryrun(log=False, delete_exp_dir=False)
            exp_dir = Path(exp.jobs[0].executor.experiment_dir)
            return (exp_dir / f"{stage}_sbatch.sh").read_text()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
