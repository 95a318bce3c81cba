"""Maps the source folders to import names: core/ is `kvyard`, plugins/ is `kvyard_plugins`."""
from setuptools import find_packages, setup

SOURCES = {"kvyard": "core", "kvyard_plugins": "plugins"}


def packages() -> list[str]:
    found = []
    for name, folder in SOURCES.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    packages=packages(),
    package_dir=SOURCES,
    package_data={"kvyard": ["py.typed"]},
    include_package_data=True,
)
