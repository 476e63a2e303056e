"""Maps the design card's layout into one import package.

The repository keeps `services/` and `trainer/` at the top, as the architecture fixes; the wheel
installs them as `moaa.services` and `moaa.trainer`, so nothing with a generic name lands at the top of
site-packages. Everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

MAPPED = {"moaa.services": "services", "moaa.trainer": "trainer"}

packages = find_packages(include=["moaa", "moaa.*"])
for pkg, folder in MAPPED.items():
    packages += [pkg] + [f"{pkg}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir={"moaa": "moaa", **MAPPED})
