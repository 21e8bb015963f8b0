"""INT8 post-training static quantization of an exported SR graph with onnxruntime's tools.

* Format: QDQ (QuantizeLinear/DequantizeLinear pairs around each quantized tensor), uint8 activations,
  int8 weights, per-channel weight scales by default. onnxruntime's CPU provider fuses the pairs into
  integer kernels (QLinearConv, ...). ``reduce_range=True`` (default) quantizes weights to 7 bits: on x86
  CPUs without VNNI the u8 x s8 dot products saturate 16-bit intermediates, which costs these networks
  ~2 dB; with 7-bit weights they cannot saturate (see ``docs/export.md`` for measurements).
* Calibration: LR patches (:func:`calibration_patches`), activation ranges by ``"minmax"``,
  ``"percentile"`` or ``"entropy"``. Ranges are computed once per method and cached, so trying
  keep-fp32 sets does not re-run calibration.
* Pixel range (``pin_io=True``, default): the graph input and the tensor that becomes the output image get
  the fixed range ``[0, input_range]`` instead of the calibrated one. For pixel inputs (``k/255 *
  input_range``) the input quantization is then lossless (scale 1 for 0-255 nets, 1/255 for 0-1 nets),
  and the output's uint8 grid is exactly the grid of the final ``uint8`` image, so output rounding costs
  nothing beyond the ``to_uint8`` rounding every network pays. The quantized graph takes and returns the
  same float tensors as the fp32 one.
* Keep-fp32: ``keep_fp32`` names layers (the PyTorch name of a conv, ``"B1.esa.conv4"``, or an ONNX node
  name) to leave in float. :meth:`Int8Quantizer.sensitivity` measures, on the calibration patches, how much of the INT8
  model's output error goes away when each conv alone is left fp32; :func:`pick_keep_fp32` takes the top ones.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .onnx import INPUT_NAME, quiet
from .session import OnnxSR, read_meta

__all__ = ["METHODS", "calibration_patches", "quantize_int8", "pick_keep_fp32", "conv_layers",
           "qdq_summary", "Int8Quantizer"]

METHODS = ("minmax", "percentile", "entropy")
WEIGHT_TYPES = ("int8", "uint8")
#: Ops that only move data: the output image is pinned through them back to the producing tensor.
_DATA_MOVEMENT = ("DepthToSpace", "Reshape", "Transpose", "Identity")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def calibration_patches(pairs: Sequence[Any], count: int = 32, size: int = 64, input_range: float = 255.0,
                        seed: int = 0) -> np.ndarray:
    """``count`` random ``size x size`` LR crops as float32 ``count x 3 x size x size`` in ``[0, input_range]``.

    ``pairs``: SR pairs (their ``.lr``) or uint8 ``H x W x 3`` arrays. Crops are drawn round-robin over the
    images that are at least ``size`` pixels on both sides (a ``ValueError`` if none is).
    """
    count = _check_int("count", count, 1)
    size = _check_int("size", size, 16)
    if isinstance(pairs, np.ndarray) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError("pairs: no calibration images given")
    images = []
    for i, p in enumerate(pairs):
        img = p.lr if hasattr(p, "lr") else p
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"pairs[{i}]: expected a uint8 H x W x 3 LR image")
        if img.shape[0] >= size and img.shape[1] >= size:
            images.append(img)
    if not images:
        raise ValueError(f"pairs: no LR image is at least {size} x {size} pixels; lower the patch size")
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), np.float32)
    for k in range(count):
        img = images[k % len(images)]
        top = int(rng.integers(0, img.shape[0] - size + 1))
        left = int(rng.integers(0, img.shape[1] - size + 1))
        out[k] = img[top:top + size, left:left + size].transpose(2, 0, 1)
    return out * np.float32(input_range / 255.0)


def _reader(patches: np.ndarray, batch: int = 8) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class PatchReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: patches[i:i + batch]} for i in range(0, len(patches), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return PatchReader()


def conv_layers(onnx_path: str | os.PathLike[str]) -> dict[str, str]:
    """``{layer name: ONNX node name}`` for every Conv, the layer named after its weight (``B1.c1_r``)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    out = {}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            w = node.input[1]
            out[w[: -len(".weight")] if w.endswith(".weight") else w] = node.name
    return out


def qdq_summary(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts of QuantizeLinear/DequantizeLinear nodes, of convs with quantized weights, and float convs."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    ops = [n.op_type for n in graph.node]
    produced_by = {o: n for n in graph.node for o in n.output}
    quantized, plain = [], []
    for n in graph.node:
        if n.op_type != "Conv":
            continue
        src = produced_by.get(n.input[1])
        (quantized if src is not None and src.op_type == "DequantizeLinear" else plain).append(n.name)
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear"),
            "convs_int8": len(quantized), "convs_fp32": len(plain), "fp32_conv_nodes": plain}


def _pinned_tensors(onnx_path: Path) -> list[str]:
    """The graph input and the tensor(s) the output image is a data-movement view of."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    produced_by = {o: n for n in graph.node for o in n.output}
    names = [graph.input[0].name]
    for out in graph.output:
        t = out.name
        while t in produced_by and produced_by[t].op_type in _DATA_MOVEMENT:
            t = produced_by[t].input[0]
        names += [out.name, t] if t != out.name else [t]
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run the block with ``path`` as the working directory (restored afterwards)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class Int8Quantizer:
    """Quantize one exported graph repeatedly (methods, keep-fp32 sets) with one calibration per method.

    Use as a context manager (a temporary folder holds the pre-processed graph and calibration caches).
    """

    def __init__(self, onnx_path: str | os.PathLike[str], calib: np.ndarray, *, per_channel: bool = True,
                 reduce_range: bool = True, pin_io: bool = True, op_types: Sequence[str] | None = None,
                 percentile: float = 99.999, preprocess: bool = True, threads: int = 1,
                 weight_type: str = "int8") -> None:
        self.source = Path(onnx_path)
        if not self.source.is_file():
            raise ValueError(f"onnx_path: no ONNX file at {self.source}")
        if not isinstance(calib, np.ndarray) or calib.ndim != 4 or calib.shape[1] != 3 or len(calib) == 0:
            raise ValueError("calib must be a non-empty float array N x 3 x H x W (see calibration_patches)")
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if weight_type not in WEIGHT_TYPES:
            raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
        self.weight_type = weight_type
        self.calib = np.ascontiguousarray(calib, dtype=np.float32)
        self.per_channel, self.reduce_range, self.pin_io = bool(per_channel), bool(reduce_range), bool(pin_io)
        self.op_types = list(op_types) if op_types else None
        self.percentile, self.preprocess, self.threads = float(percentile), bool(preprocess), threads
        self.meta = read_meta(self.source)
        self.input_range = float(self.meta.get("input_range", 255.0))
        self._tmp: Path | None = None
        self._model: Path | None = None
        self._count = 0

    def __enter__(self) -> Int8Quantizer:
        self._tmp = Path(tempfile.mkdtemp(prefix="effsr-int8-"))
        model = self._tmp / "model.onnx"
        if self.preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            try:  # onnxruntime leaves temporary files in the working directory when it fails: run it in ours
                with quiet(), _working_dir(self._tmp):
                    quant_pre_process(str(Path(self.source).resolve()), str(model), skip_symbolic_shape=False)
            except Exception:  # noqa: BLE001 - onnxruntime's symbolic shape inference gives up on some graphs
                try:  # its ONNX shape inference and graph optimisation alone
                    with quiet(), _working_dir(self._tmp):
                        quant_pre_process(str(Path(self.source).resolve()), str(model), skip_symbolic_shape=True)
                except Exception as err:  # noqa: BLE001 - one line naming the graph, not onnxruntime's traceback
                    shutil.rmtree(self._tmp, ignore_errors=True)
                    self._tmp = None
                    raise ValueError(f"onnx_path: onnxruntime cannot prepare {self.source} for quantization: "
                                     f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
        else:
            shutil.copyfile(self.source, model)
        self._model = model
        self.layers = conv_layers(model)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = self._model = None

    def _require(self) -> tuple[Path, Path]:
        if self._tmp is None or self._model is None:
            raise RuntimeError("Int8Quantizer must be used inside a `with` block")
        return self._tmp, self._model

    def node_names(self, keep_fp32: Iterable[str]) -> list[str]:
        """ONNX node names for layer or node names (``ValueError`` naming an unknown one)."""
        nodes = set(self.layers.values())
        out = []
        for name in keep_fp32:
            if name in self.layers:
                out.append(self.layers[name])
            elif name in nodes:
                out.append(name)
            else:
                raise ValueError(f"keep_fp32: no conv layer or node named {name!r}; layers: "
                                 f"{', '.join(list(self.layers)[:8])}, ...")
        return list(dict.fromkeys(out))

    def quantize(self, out_path: str | os.PathLike[str], method: str = "minmax",
                 keep_fp32: Iterable[str] = ()) -> Path:
        """Write the INT8 QDQ graph to ``out_path``; ``keep_fp32``: layer or node names left in float."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        tmp, model = self._require()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        exclude = self.node_names(keep_fp32)
        extra: dict[str, Any] = {"CalibPercentile": self.percentile, "CalibMaxIntermediateOutputs": 64}
        if self.pin_io:
            extra["TensorQuantOverrides"] = {t: [{"rmin": np.float32(0.0), "rmax": np.float32(self.input_range)}]
                                             for t in _pinned_tensors(model)}
        calib_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        cache: dict[str, Any] = {}
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:  # onnxruntime >= 1.23
            cache["calibration_cache_path"] = str(tmp / f"calib_{method}.json")
        with quiet():
            quantize_static(str(model), str(out_path), _reader(self.calib), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=self.op_types, per_channel=self.per_channel,
                            reduce_range=self.reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8 if self.weight_type == "int8" else QuantType.QUInt8,
                            nodes_to_exclude=exclude or None,
                            calibrate_method=calib_method, extra_options=extra, **cache)
        _copy_meta(self.source, out_path)
        return out_path

    def output_error(self, onnx_path: str | os.PathLike[str], reference: np.ndarray) -> float:
        """PSNR (dB, peak 255) of the graph's output against ``reference`` on the first calibration patches."""
        graph = OnnxSR(onnx_path, threads=self.threads)
        x = self.calib[: len(reference)]
        out = np.concatenate([graph.run_numpy(x[i:i + 8]) for i in range(0, len(x), 8)])
        k = 255.0 / self.input_range
        diff = (np.clip(out, 0, self.input_range) - np.clip(reference, 0, self.input_range)) * k
        mse = float(np.mean(diff.astype(np.float64) ** 2))
        return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)

    def reference(self, patches: int | None = None) -> np.ndarray:
        """The fp32 graph's output on the first ``patches`` calibration patches (all by default)."""
        _, model = self._require()
        graph = OnnxSR(model, threads=self.threads)
        x = self.calib[:patches] if patches else self.calib
        return np.concatenate([graph.run_numpy(x[i:i + 8]) for i in range(0, len(x), 8)])

    def sensitivity(self, method: str = "minmax", candidates: Sequence[str] | None = None,
                    patches: int = 8) -> dict[str, Any]:
        """How much each conv costs when quantized: leave it alone in fp32 and measure the output again.

        Calibration uses every patch (once per method, cached); the output error is measured on the first
        ``patches`` of them (each probe costs one quantization and ``patches`` forward passes).

        Returns ``{"psnr_all": dB of the all-INT8 graph vs fp32 on the calibration patches,
        "layers": [{"layer", "node", "psnr_without", "gain_db"}, ...] best gain first}``.
        """
        tmp, _ = self._require()
        patches = _check_int("patches", patches, 1)
        ref = self.reference(patches)
        base = self.output_error(self.quantize(tmp / "all.onnx", method), ref)
        rows = []
        for layer in (candidates if candidates is not None else list(self.layers)):
            path = self.quantize(tmp / "probe.onnx", method, keep_fp32=[layer])
            psnr = self.output_error(path, ref)
            gain = (psnr - base) if math.isfinite(psnr) and math.isfinite(base) else (math.inf if psnr > base else 0.0)
            rows.append({"layer": layer, "node": self.node_names([layer])[0], "psnr_without": psnr, "gain_db": gain})
        rows.sort(key=lambda r: r["gain_db"], reverse=True)
        return {"method": method, "psnr_all": base, "patches": int(len(ref)), "layers": rows}


def _copy_meta(src: Path, dst: Path) -> None:
    import onnx

    meta = read_meta(src)
    proto = onnx.load(str(dst))
    have = {p.key for p in proto.metadata_props}
    for key, value in {**meta, "quantization": "int8-qdq"}.items():
        if f"effsr.{key}" not in have:
            entry = proto.metadata_props.add()
            entry.key, entry.value = f"effsr.{key}", value
    onnx.save(proto, str(dst))


def pick_keep_fp32(sens: dict[str, Any], count: int = 3, min_gain_db: float = 0.01) -> list[str]:
    """The ``count`` layers whose fp32 copy helps most (gain above ``min_gain_db``)."""
    count = _check_int("count", count, 0)
    return [r["layer"] for r in sens["layers"] if r["gain_db"] > min_gain_db][:count]


def quantize_int8(onnx_path: str | os.PathLike[str], calib: np.ndarray, out_path: str | os.PathLike[str], *,
                  method: str = "minmax", keep_fp32: Sequence[str] | str = (), keep_count: int = 3,
                  per_channel: bool = True, reduce_range: bool = True, pin_io: bool = True,
                  op_types: Sequence[str] | None = None, percentile: float = 99.999,
                  weight_type: str = "int8", threads: int = 1) -> dict[str, Any]:
    """Quantize ``onnx_path`` to an INT8 QDQ graph at ``out_path``, calibrated on ``calib`` patches.

    ``keep_fp32``: layer/node names to leave in float, or ``"auto"`` (the ``keep_count`` most sensitive convs
    by :meth:`Int8Quantizer.sensitivity` on ``calib``). Returns ``{"path", "method", "keep_fp32",
    "sensitivity" (auto only), "qdq": qdq_summary, options...}``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    with Int8Quantizer(onnx_path, calib, per_channel=per_channel, reduce_range=reduce_range, pin_io=pin_io,
                       op_types=op_types, percentile=percentile, threads=threads, weight_type=weight_type) as q:
        sens = None
        if isinstance(keep_fp32, str):
            if keep_fp32 != "auto":
                raise ValueError(f"keep_fp32 must be 'auto' or a list of layer names, got {keep_fp32!r}")
            sens = q.sensitivity(method)
            keep = pick_keep_fp32(sens, keep_count)
        else:
            keep = list(keep_fp32)
            q.node_names(keep)  # unknown names fail before any work
        path = q.quantize(out_path, method, keep)
    info: dict[str, Any] = {"path": str(path), "method": method, "keep_fp32": keep, "per_channel": per_channel,
                            "reduce_range": reduce_range, "weight_type": weight_type, "pin_io": pin_io,
                            "op_types": op_types,
                            "calibration_patches": [int(s) for s in calib.shape], "qdq": qdq_summary(path)}
    if method == "percentile":
        info["percentile"] = percentile
    if sens is not None:
        info["sensitivity"] = sens
    return info
