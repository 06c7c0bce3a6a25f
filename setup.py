"""Package list only; metadata lives in pyproject.toml.

recipes/ and yaml/ stay at the top of the repository, where users look for them, and
install as retro_toolkit._recipes and retro_toolkit._yaml so a wheel carries them too.
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
packages = find_packages(include=["retro_toolkit", "retro_toolkit.*"])
package_dir = {"retro_toolkit": "retro_toolkit"}
package_data = {"retro_toolkit.data": ["*.json", "*.jsonl"]}
for top, name in (("recipes", "retro_toolkit._recipes"), ("yaml", "retro_toolkit._yaml")):
    for folder in [here / top, *sorted(p for p in (here / top).rglob("*") if p.is_dir())]:
        rel = folder.relative_to(here)
        pkg = ".".join([name, *rel.parts[1:]])
        packages.append(pkg)
        package_dir[pkg] = str(rel)
        package_data[pkg] = ["*.yaml", "*.jsonl", "*.txt"]

setup(packages=packages, package_dir=package_dir, package_data=package_data)
