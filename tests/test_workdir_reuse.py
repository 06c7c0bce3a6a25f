"""A work directory made by the previous release stays current under this code: no stage reruns.

tests/data/release_fingerprints.json holds every bundled recipe's stage fingerprints (and a
few variants) as the release computed them; tests/data/release_workdir/stages/ holds the
manifests its smoke run wrote. Both were made by tests/data/make_release_fingerprints.py and
`retro-run recipes/smoke.yaml` under that release.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


def _maker():
    spec = importlib.util.spec_from_file_location("make_release_fingerprints", DATA / "make_release_fingerprints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_recipes_keep_the_release_fingerprints():
    maker = _maker()
    release = json.loads((DATA / "release_fingerprints.json").read_text())
    maker.stand_in_data()
    now = {}
    for f in sorted(maker.RECIPES.glob("*.yaml")):
        for overrides in maker.VARIANTS.get(f.stem, [[]]):
            now[" ".join([f.name, *overrides])] = maker.fingerprints(f, overrides)
    assert set(now) == set(release), "a bundled recipe was added or removed: regenerate under the release"
    changed = {k: [s for s in v if v[s] != release[k].get(s)] for k, v in now.items() if v != release[k]}
    assert not changed, f"stages that would rerun in existing work directories: {changed}"


def test_the_release_smoke_work_directory_is_reused_without_running_a_stage(tmp_path):
    workdir = tmp_path / "smoke"
    shutil.copytree(DATA / "release_workdir" / "stages", workdir / "stages")
    manifests = sorted((workdir / "stages").glob("*.json"))
    assert len(manifests) == 8
    for m in manifests:  # the outputs exist (their content is never read when nothing reruns)
        for out in json.loads(m.read_text())["outputs"]:
            (workdir / out).parent.mkdir(parents=True, exist_ok=True)
            (workdir / out).touch()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "retro_toolkit", str(REPO / "recipes" / "smoke.yaml"),
                           f"workdir={workdir}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = [line.split() for line in proc.stdout.splitlines() if line.startswith(("  run ", "  skip "))]
    assert len(plan) == 8 and all(p[0] == "skip" for p in plan), proc.stdout
