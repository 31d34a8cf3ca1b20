"""SAN — Scale-Space Attention Networks (Garg, Candan, Sapino, ICDE 2020), attention modules and backbones."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("san")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
