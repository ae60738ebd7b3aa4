"""Show, Attend and Tell image captioning."""

from importlib.metadata import PackageNotFoundError, version

from .options import DecodingOptions

__all__ = ["Captioner", "DecodingOptions", "load_captioner"]


def __getattr__(name: str):
    # Loaded on first use: importing the package (e.g. the torch-free captioner.inference) must not import torch.
    if name in ("Captioner", "load_captioner"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

try:  # one version, pyproject.toml's, as installed
    __version__ = version("captioner")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
