"""Show, Attend and Tell image captioning."""

from importlib.metadata import PackageNotFoundError, version

from .api import Captioner, load_captioner
from .decoding import DecodingOptions

__all__ = ["Captioner", "DecodingOptions", "load_captioner"]

try:  # one version, pyproject.toml's, as installed
    __version__ = version("captioner")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
