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
    # the GGUF kernels are compiled from source at first use
    package_data={"kvyard_plugins.quantization": ["*.cpp", "*.h"],
                  "kvyard_plugins.attention.cpu_kernels": ["*.cpp"],
                  "kvyard.kernels.cpu_ops": ["*.cpp"],
                  "kvyard.kernels": ["csrc/*.h"]},
    include_package_data=True,
)
