"""Captioning without PyTorch: ONNX Runtime, numpy and Pillow only (the `serve` install, see README).

    from captioner.inference import load_bundle
    captioner = load_bundle()                   # the shipped model's exported graphs (captioner/weights/onnx/)
    print(captioner.caption("photo.jpg").caption)

Nothing in this package imports torch (tests/test_inference_slim.py runs it with torch blocked). The graphs are
exported from the torch model by `captioner.engine.export_bundle` (scripts/export_onnx_bundle.py), checked
against torch there; decoding (greedy, sampling, beam search, blocking) is `captioner.inference.decoding`.
"""

from .captioner import BundleError, Candidate, CaptionResult, SlimCaptioner, load_bundle, shipped_bundle_path

__all__ = ["BundleError", "CaptionResult", "Candidate", "SlimCaptioner", "load_bundle", "shipped_bundle_path"]
