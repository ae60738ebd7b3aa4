"""Inference engines for the frozen encoder: eager PyTorch, or the same weights exported to ONNX Runtime on CPU.

The torch `Encoder` stays the source of truth. The ONNX graph is exported from it (opset 17, dynamic batch),
checked against it on a probe batch (the max abs difference is printed; above `tolerance` the graph is refused),
and cached on disk under a key that changes when the backbone, the input size or any weight changes, so a
fine-tuned encoder gets its own graph. Nothing is downloaded. A cached graph that is missing, truncated or
altered (its sidecar holds its sha256) is exported again, never fatal.

    engine = make_encoder_engine(encoder, "auto")   # "auto" | "onnx" | "torch"
    features = engine(images)                       # images (B, 3, S, S) preprocessed -> (B, L, D)

"auto" is ONNX Runtime on CPU when `onnxruntime` is importable (and the export passes its check), torch
otherwise and on other devices. On the shared 2-core machines this repo is developed on, Lite0 at 448 px runs
in ~0.3x the time of eager PyTorch (benchmarks/caption_latency.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .checkpoint import atomic_path
from .encoder import Encoder

log = logging.getLogger(__name__)

EngineName = Literal["auto", "onnx", "torch"]
ENGINES: tuple[str, ...] = ("auto", "onnx", "torch")
OPSET = 17
EXPORT_VERSION = 1  # bump when the way graphs are exported changes: old cache entries are then ignored
DEFAULT_TOLERANCE = 1e-3  # max abs difference to torch, relative to the largest feature of the probe batch


class EngineError(RuntimeError):
    """The requested engine cannot be used (not installed, export failed its check, ...)."""


def default_cache_dir() -> Path:
    """$CAPTIONER_CACHE_DIR, else $XDG_CACHE_HOME/captioner (~/.cache/captioner)."""
    if os.environ.get("CAPTIONER_CACHE_DIR"):
        return Path(os.environ["CAPTIONER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "captioner"


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_engine(engine: str, device: torch.device | str = "cpu") -> str:
    """"auto" -> "onnx" on CPU when onnxruntime is importable, else "torch"; the others are checked and kept."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    cpu = torch.device(device).type == "cpu"
    if engine == "auto":
        return "onnx" if cpu and onnxruntime_available() else "torch"
    if engine == "onnx":
        if not cpu:
            raise EngineError(f"the onnx engine runs on CPU only, not on {device}: use engine='torch' there")
        if not onnxruntime_available():
            raise EngineError("the onnx engine needs onnxruntime: pip install onnxruntime (or use engine='torch')")
    return engine


# --------------------------------------------------------------------------------------------------------------
# Engines: callables images (B, 3, S, S) -> features (B, L, D), both on the encoder's device.


class TorchEncoderEngine:
    """Eager PyTorch: `Encoder.encode` (one image per CNN pass on CPU, where batching does not pay)."""

    name = "torch"

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.grid = encoder.grid_size()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(images)


class OnnxEncoderEngine:
    """ONNX Runtime session over the exported encoder graph (CPU)."""

    name = "onnx"

    def __init__(self, path: Path, grid: tuple[int, int], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the same budget as torch's
        options.inter_op_num_threads = 1
        # Spinning worker threads steal the cores the decoder (torch) needs right after each encoder pass, and
        # other processes' on a shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.grid = grid
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    # Images per session run. Unlike eager torch (whose big activations are page-faulted in afresh every pass),
    # ONNX Runtime keeps its own memory arena: on an idle 2-core machine one run over 16 images takes 0.73-0.79x
    # the time of 16 single runs (benchmarks/caption_latency.py; 1.19x on a saturated machine at one thread). The
    # service still passes one image at a time on CPU (service/batching.py says why).
    max_batch = 16

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()
        chunks = [self.session.run(None, {self._input: pixels[i : i + self.max_batch]})[0]
                  for i in range(0, len(pixels), self.max_batch)]
        return torch.from_numpy(np.concatenate(chunks) if len(chunks) > 1 else chunks[0])


def make_encoder_engine(
    encoder: Encoder,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> TorchEncoderEngine | OnnxEncoderEngine:
    """The engine that runs `encoder` for inference. "onnx" raises EngineError when it cannot be used; "auto" then
    falls back to torch with a warning."""
    device = next(encoder.parameters()).device
    resolved = resolve_engine(engine, device)
    if resolved == "torch":
        return TorchEncoderEngine(encoder)
    try:
        return load_onnx_encoder(encoder, cache_dir, tolerance)
    except EngineError as exc:
        if engine == "onnx":
            raise
        log.warning("onnx engine unavailable, using torch: %s", exc)
        print(f"captioner: onnx engine unavailable, using torch ({exc})", file=sys.stderr)
        return TorchEncoderEngine(encoder)


# --------------------------------------------------------------------------------------------------------------
# The on-disk cache of exported graphs.


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, values): any changed weight changes it."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def graph_key(encoder: Encoder) -> str:
    """Cache key: backbone name, input size, weights, opset and export version."""
    fields = [encoder.name, encoder.preprocessing.image_size, weights_digest(encoder.cnn), OPSET, EXPORT_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]


@dataclass
class GraphFiles:
    graph: Path  # the .onnx file
    sidecar: Path  # .json: sha256 of the graph, grid, the export check's result

    @classmethod
    def for_encoder(cls, encoder: Encoder, cache_dir: str | Path | None = None) -> GraphFiles:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        stem = f"{encoder.name}-{encoder.preprocessing.image_size}px-{graph_key(encoder)}"
        return cls(folder / f"{stem}.onnx", folder / f"{stem}.json")


def load_onnx_encoder(
    encoder: Encoder, cache_dir: str | Path | None = None, tolerance: float = DEFAULT_TOLERANCE
) -> OnnxEncoderEngine:
    """The cached graph of this encoder if it is intact, else a fresh export (checked, then cached)."""
    if not onnxruntime_available():
        raise EngineError("onnxruntime is not installed")
    files = GraphFiles.for_encoder(encoder, cache_dir)
    meta = _intact_sidecar(files)
    if meta is not None:
        try:
            return OnnxEncoderEngine(files.graph, tuple(meta["grid"]))
        except Exception as exc:  # unreadable by this onnxruntime: export again
            log.warning("cached encoder graph %s unusable (%s): exporting again", files.graph, exc)
    meta = export_encoder(encoder, files, tolerance)
    return OnnxEncoderEngine(files.graph, tuple(meta["grid"]))


def _intact_sidecar(files: GraphFiles) -> dict | None:
    """The sidecar of a complete, unaltered cache entry, else None (and the reason is logged)."""
    if not files.graph.is_file() or not files.sidecar.is_file():
        return None
    try:
        meta = json.loads(files.sidecar.read_text())
        if meta["sha256"] == _file_sha256(files.graph):
            return meta
        reason = "its content does not match its recorded sha256"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = f"unreadable sidecar ({exc})"
    log.warning("cached encoder graph %s is corrupt (%s): exporting again", files.graph, reason)
    print(f"captioner: cached encoder graph {files.graph.name} is corrupt ({reason}): exporting again",
          file=sys.stderr)
    return None


def export_encoder(encoder: Encoder, files: GraphFiles, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Export `encoder` to ONNX, check it against torch on a probe batch, then move it into the cache atomically.
    Returns the sidecar's content. Raises EngineError when the export fails or differs beyond `tolerance`."""

    encoder = encoder.eval()
    size = encoder.preprocessing.image_size
    generator = torch.Generator().manual_seed(0)
    # A probe batch of two (so the dynamic batch axis is exercised) in the normalised range real photos have.
    probe = encoder.preprocessing.normalize(torch.rand(2, 3, size, size, generator=generator))
    with atomic_path(files.graph, suffix=".onnx.tmp") as tmp:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's shape-inference chatter
                torch.onnx.export(
                    encoder, (probe[:1],), str(tmp), opset_version=OPSET, dynamo=False,
                    input_names=["images"], output_names=["features"],
                    dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                )
        except Exception as exc:  # e.g. the `onnx` package missing, an operator without an ONNX equivalent
            raise EngineError(f"exporting {encoder.name} to ONNX failed: {type(exc).__name__}: {exc}") from exc
        # Checked through the session inference will use (same options), in one pass of two images so that the
        # dynamic batch axis is exercised.
        engine = OnnxEncoderEngine(tmp, encoder.grid_size())
        engine.max_batch = len(probe)
        got = engine(probe)
        with torch.no_grad():
            expected = encoder(probe)
        diff = float((got - expected).abs().max())
        scale = max(1.0, float(expected.abs().max()))
        print(f"captioner: exported {encoder.name} at {size} px to ONNX: max abs difference to torch {diff:.2e} "
              f"(tolerance {tolerance * scale:.1e})", file=sys.stderr)
        if not np.isfinite(diff) or diff > tolerance * scale:
            raise EngineError(f"the ONNX graph of {encoder.name} differs from torch by {diff:.2e} "
                              f"(> {tolerance * scale:.1e}): refused")
        del engine
        meta = {
            "sha256": _file_sha256(tmp),
            "backbone": encoder.name,
            "image_size": size,
            "grid": list(encoder.grid_size()),
            "feature_dim": encoder.feature_dim,
            "opset": OPSET,
            "max_abs_diff": diff,
            "torch": torch.__version__,
        }
    with atomic_path(files.sidecar) as tmp:  # last: its presence completes the entry
        tmp.write_text(json.dumps(meta, indent=1))
    return meta


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The decoder's init_state / step as ONNX graphs: what the torch-free install (captioner/inference/) decodes with.
# One graph pair per decoder (ensembles member by member); inputs and outputs in captioner/inference/onnx_decoder.py.

DECODER_TOLERANCE = 1e-4  # fp32 graphs: max abs difference to torch, relative to the largest value compared
INT8_TOLERANCE = 0.25  # int8 graphs: the same, for rounding of int8 weights and activations (captions: tests)


class _InitGraph(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor):
        state = self.decoder.init_state(features)
        return state.h, state.c, state.projected_features


class _StepGraph(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, h, c, features, projected, location, tokens):
        from .model import DecoderState

        state = DecoderState(h, c, features, projected, h.new_ones(h.size(0), 1), location)  # beta is not read
        logits, alpha, new = self.decoder.step(state, tokens)
        return logits, alpha, new.h, new.c, new.beta, new.location + 0  # + 0: an output of its own, never an input


class _SoftLstmStepGraph(torch.nn.Module):
    """`AttentionDecoder.step` of the shipped kind (soft attention, one LSTM layer), regrouped for inference: the
    same function (to float rounding), in fewer and larger products.

    - h_{t-1} feeds three products (the LSTM's recurrent gates, the attention's W_h, the gate f_beta): one matrix.
    - x_t = [E y_{t-1}, beta z_t] feeds the LSTM's input gates and the deep output's L_z z_t (L_z's input is the
      gated context, the second part of x_t): one matrix, with zeros where L_z would read E y_{t-1}.
    - The gates in the order (input, forget, output, cell): one sigmoid over 3H, one tanh over H.
    - tanh as ONNX's Tanh (captioner.model.fast_tanh is for torch's CPU kernels; as four ONNX operators it is
      slower than one).
    Every row keeps its own copy of the image's features: ONNX Runtime's (N, 1, L) @ (N, L, D) product is faster
    than one (B, K, L) @ (B, L, D) over an image's K rows (35 vs 48 us, one thread, K = 2).
    """

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        c = decoder.config
        self.sizes = (c.embed_dim, c.hidden_dim, c.attention_dim)
        e, hidden = c.embed_dim, c.hidden_dim
        cell, attention = decoder.cells[0], decoder.attention
        gate_order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden),
                                torch.arange(2 * hidden, 3 * hidden)])  # (i, f, g, o) -> (i, f, o, g)
        with torch.no_grad():
            self.from_hidden = torch.nn.Linear(hidden, 4 * hidden + c.attention_dim + 1)
            self.from_hidden.weight.copy_(torch.cat([cell.weight_hh[gate_order], attention.hidden_proj.weight,
                                                     decoder.gate.weight]))
            self.from_hidden.bias.copy_(torch.cat([(cell.bias_ih + cell.bias_hh)[gate_order],
                                                   attention.hidden_proj.bias, decoder.gate.bias]))
            self.from_input = torch.nn.Linear(e + c.feature_dim, 4 * hidden + e, bias=False)
            to_output = torch.cat([torch.zeros(e, e), decoder.out_context.weight], dim=1)  # (E, E + D)
            self.from_input.weight.copy_(torch.cat([cell.weight_ih[gate_order], to_output]))
            self.out_hidden = torch.nn.Linear(hidden, e)
            self.out_hidden.weight.copy_(decoder.out_hidden.weight)
            self.out_hidden.bias.copy_(decoder.out_hidden.bias + decoder.out_context.bias)
            self.score = torch.nn.Parameter(attention.score.weight.t().clone())  # (A, 1)
        self.embedding = decoder.embedding
        self.out_vocab = decoder.out_vocab

    def forward(self, h, c, features, projected, location, tokens):
        e, hidden, a = self.sizes
        recurrent, attention_h, gate = self.from_hidden(h[:, 0]).split([4 * hidden, a, 1], dim=1)
        pre_activation = projected + attention_h.unsqueeze(1)  # (N, L, A)
        alpha = torch.softmax(torch.matmul(torch.tanh(pre_activation), self.score).squeeze(2), dim=1)  # (N, L)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (N, D)
        beta = torch.sigmoid(gate)  # (N, 1)
        embedded = self.embedding(tokens)  # (N, E)
        input_gates, output_context = self.from_input(torch.cat([embedded, beta * context], dim=1)).split(
            [4 * hidden, e], dim=1)
        gates = recurrent + input_gates
        input_gate, forget_gate, output_gate = torch.sigmoid(gates[:, : 3 * hidden]).chunk(3, dim=1)
        c_new = forget_gate * c[:, 0] + input_gate * torch.tanh(gates[:, 3 * hidden :])
        h_new = output_gate * torch.tanh(c_new)
        logits = self.out_vocab(embedded + self.out_hidden(h_new) + output_context)  # (N, V)
        return logits, alpha, h_new.unsqueeze(1), c_new.unsqueeze(1), beta, location + 0  # + 0: see _StepGraph


def _step_graph(decoder: torch.nn.Module) -> torch.nn.Module:
    """The regrouped step for the shipped kind; the step as it is for the others (GRU, hard attention, several
    layers, an embedding tied to the output)."""
    c = decoder.config
    regroupable = c.cell == "lstm" and c.attention == "soft" and c.num_layers == 1 and not c.tie_weights
    return _SoftLstmStepGraph(decoder) if regroupable else _StepGraph(decoder)


def _probe_features(decoder: torch.nn.Module, locations: int) -> torch.Tensor:
    """Two images' worth of features in the range real ones have (the backbones end in ReLU / ReLU6)."""
    generator = torch.Generator().manual_seed(0)
    return 3 * torch.rand(2, locations, decoder.config.feature_dim, generator=generator)


def export_decoder(
    decoder: torch.nn.Module, init_path: Path, step_path: Path, locations: int, quantize: bool = False
) -> dict:
    """Export one AttentionDecoder's init_state and step (opset 17, dynamic rows), int8 weights if `quantize`
    (ONNX Runtime's dynamic quantisation, per-channel). Checked against torch on a probe batch over two steps;
    each file is written atomically. Returns what the check measured. EngineError when it fails."""
    from .inference.onnx_decoder import OnnxDecoder

    decoder = decoder.eval().cpu()
    features = _probe_features(decoder, locations)
    with torch.no_grad():
        # Traced with two rows per image (as beam search runs it), so that nothing is specialised to one.
        state = decoder.init_state(features).select(torch.tensor([0, 0, 1, 1]))
        tokens = torch.tensor([5, 9, 5, 7], dtype=torch.long)
        step_args = (state.h, state.c, state.features, state.projected_features, state.location, tokens)
    # Wrappers in eval mode: torch.onnx.export leaves the whole module tree in the wrapper's mode afterwards.
    graphs = [(_InitGraph(decoder).eval(), (features,), init_path, ["features"], ["h", "c", "projected"]),
              (_step_graph(decoder).eval(), step_args, step_path,
               ["h", "c", "features", "projected", "location", "tokens"],
               ["logits", "alpha", "h_out", "c_out", "beta", "location_out"])]
    with ExitStack() as stack:
        tmps = []
        for module, args, path, inputs, outputs in graphs:
            tmp = stack.enter_context(atomic_path(path, suffix=".onnx.tmp"))
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(module, args, str(tmp), opset_version=OPSET, dynamo=False,
                                      input_names=inputs, output_names=outputs,
                                      dynamic_axes={name: {0: "rows"} for name in inputs + outputs})
                if quantize:
                    _quantize_graph(tmp)
            except Exception as exc:
                raise EngineError(f"exporting the decoder to ONNX failed: {type(exc).__name__}: {exc}") from exc
            tmps.append(tmp)
        diff = _check_decoder(decoder, OnnxDecoder(*tmps), features, INT8_TOLERANCE if quantize else DECODER_TOLERANCE)
    return {"max_rel_diff": diff, "quantized": quantize}


def _quantize_graph(path: Path) -> None:
    """In place: int8 weights for the graph's weight matrices (activations quantised on the fly, per tensor).
    Products of two activations (the attention's context) and small weights (the attention score vector) stay
    fp32: quantising their activations every step costs more than the product itself. Weights are unsigned
    (ONNX Runtime's U8U8 kernels): its U8S8 kernels on CPUs without AVX-512 VNNI add pairs of products in 16
    bits, which saturate, so the signed weights gave other captions there (41 of 300 coco-3k val captions unlike
    torch's, against 13 unsigned, at the same speed: docs/performance.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(path))
    matrices = {i.name for i in model.graph.initializer if len(i.dims) == 2 and np.prod(i.dims) >= 1 << 16}
    # Excluded by name: the quantiser renames the Gemm nodes it quantises (into MatMul + Add) before it matches.
    others = [node.name for node in model.graph.node
              if node.op_type in ("MatMul", "Gemm") and not any(name in matrices for name in node.input)]
    quantized = path.with_name(path.name + ".int8")
    try:
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QUInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=others)
        os.replace(quantized, path)
    finally:
        quantized.unlink(missing_ok=True)


def _check_decoder(decoder: torch.nn.Module, graphs, features: torch.Tensor, tolerance: float) -> float:
    """Two steps of the graphs against torch's init_state / step, with one row per image and then two (as beam
    search): the largest difference of logits, alpha, beta, h and c, each relative to its largest magnitude.
    Above `tolerance`: EngineError."""
    worst = 0.0
    with torch.no_grad():
        initial = decoder.init_state(features)
        array_initial = graphs.init_state(features.numpy())
        pairs = [(initial.h, array_initial.h), (initial.c, array_initial.c),
                 (initial.projected_features, array_initial.projected_features)]
        for rows in (torch.arange(len(features)), torch.arange(len(features)).repeat_interleave(2)):
            state, array_state = initial.select(rows), array_initial.select(rows.numpy())
            tokens = torch.ones(len(rows), dtype=torch.long)
            for _ in range(2):
                logits, alpha, state = decoder.step(state, tokens)
                got_logits, got_alpha, array_state = graphs.step(array_state, tokens.numpy())
                pairs += [(logits, got_logits), (alpha, got_alpha), (state.beta, array_state.beta),
                          (state.h, array_state.h), (state.c, array_state.c)]
                # The torch model's words, fed to both: its best on even rows, its second best on odd ones, so that
                # a beam's two rows of one image differ and a graph that mixes rows up cannot pass.
                ranks = torch.arange(len(rows)) % 2
                tokens = logits.topk(2, dim=1).indices[torch.arange(len(rows)), ranks]
        for expected, got in pairs:
            diff = float(np.abs(got - expected.numpy()).max()) / max(1e-6, float(expected.abs().max()))
            worst = max(worst, diff if np.isfinite(diff) else float("inf"))
    print(f"captioner: exported the decoder to ONNX: max relative difference to torch {worst:.2e} "
          f"(tolerance {tolerance:.2g})", file=sys.stderr)
    if worst > tolerance:
        raise EngineError(f"the decoder's ONNX graphs differ from torch by {worst:.2e} (> {tolerance:.2g}): refused")
    return worst


def export_bundle(checkpoint_path: str | Path, folder: str | Path, quantize: bool = True) -> dict:
    """Every graph the torch-free install needs for a checkpoint, in `folder` (captioner/inference/captioner.py
    reads it): the encoder (fp32), each decoder member's init/step (int8 weights if `quantize`), and manifest.json
    (vocabulary, preprocessing, grid, the files' sha256) written last, atomically. Returns the manifest."""
    from .checkpoint import load_checkpoint
    from .ensemble import EnsembleDecoder
    from .inference.captioner import BUNDLE_FORMAT, BUNDLE_VERSION

    checkpoint = load_checkpoint(checkpoint_path)
    folder = Path(folder)
    encoder = Encoder(checkpoint.encoder_name, pretrained=checkpoint.encoder_state is None,
                      image_size=checkpoint.preprocessing.image_size)
    if checkpoint.encoder_state is not None:
        encoder.cnn.load_state_dict(checkpoint.encoder_state)
    encoder_meta = export_encoder(encoder.eval(), GraphFiles(folder / "encoder.onnx", folder / "encoder.json"))
    grid = encoder_meta["grid"]
    decoder = checkpoint.decoder.float().eval()
    members = list(decoder.members) if isinstance(decoder, EnsembleDecoder) else [decoder]
    entries = []
    for i, member in enumerate(members):
        names = {"init": f"decoder{i}-init.onnx", "step": f"decoder{i}-step.onnx"}
        check = export_decoder(member, folder / names["init"], folder / names["step"], grid[0] * grid[1], quantize)
        entries.append({**names, "config": member.config.to_json(), "max_rel_diff": check["max_rel_diff"]})
    (folder / "encoder.json").unlink(missing_ok=True)  # its content is in the manifest
    files = ["encoder.onnx", *(e[k] for e in entries for k in ("init", "step"))]
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "name": Path(checkpoint_path).stem,
        "checkpoint_sha256": _file_sha256(Path(checkpoint_path)),
        "encoder": "encoder.onnx",
        "backbone": checkpoint.encoder_name,
        "encoder_max_abs_diff": encoder_meta["max_abs_diff"],
        "preprocessing": checkpoint.preprocessing.to_json(),
        "grid": grid,
        "quantized": quantize,
        "members": entries,
        "vocab": list(checkpoint.vocab.itos),
        "opset": OPSET,
        "torch": torch.__version__,
        "sha256": {name: _file_sha256(folder / name) for name in files},
    }
    with atomic_path(folder / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest
