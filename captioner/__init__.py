"""Show, Attend and Tell image captioning."""

from .api import Captioner, load_captioner
from .decoding import DecodingOptions

__all__ = ["Captioner", "DecodingOptions", "load_captioner"]
__version__ = "0.1.0"
