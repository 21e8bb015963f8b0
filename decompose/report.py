"""The per-layer report of :func:`decompose.tucker_model` (JSON/CSV files and a printable table)."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["LayerReport", "TuckerReport"]


@dataclass
class LayerReport:
    """One ``nn.Conv2d`` of the model: what happened to it and why."""

    name: str
    status: str                      #: "decomposed" or "skipped"
    in_channels: int
    out_channels: int
    kernel_size: str                 #: "3x3"
    stride: str                      #: "1x1"
    groups: int
    rank_out: int | None             #: r_out (None when skipped before ranks were chosen)
    rank_in: int | None              #: r_in
    params_before: int
    params_after: int                #: == params_before when skipped
    rel_error: float | None          #: ||W - W_tucker||_F / ||W||_F of the produced layers (float64)
    seconds: float = field(default=0.0, compare=False)  #: wall time spent on this layer (not compared)
    reason: str = ""                 #: why it was skipped (empty when decomposed)
    #: data-aware runs only (:func:`decompose.data_aware_tucker_model`): relative calibration error
    #: ``||conv(x) - y_teacher||^2 / ||y_teacher||^2`` on the student's inputs, before and after this layer's fit
    calib_error_before: float | None = None
    calib_error_after: float | None = None

    @property
    def param_change(self) -> int:
        return self.params_after - self.params_before


class TuckerReport(list):
    """A list of :class:`LayerReport` rows plus model totals; ``str(report)`` is a table."""

    def __init__(self, rows: list[LayerReport] = (), model_params_before: int = 0, model_params_after: int = 0,
                 seconds: float = 0.0, spec: str = "") -> None:
        super().__init__(rows)
        self.model_params_before = model_params_before
        self.model_params_after = model_params_after
        self.seconds = seconds
        self.spec = spec
        #: data-aware budget runs: {"target": ..., "kind": "params"|"flops", "achieved": ..., "before": ...}
        self.budget: dict[str, Any] | None = None

    @property
    def decomposed(self) -> list[LayerReport]:
        return [r for r in self if r.status == "decomposed"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self if r.status != "decomposed"]

    def ranks(self) -> dict[str, tuple[int, int]]:
        """``{layer: (r_out, r_in)}`` of the decomposed layers.

        ``tucker_model(fresh_model, report.ranks())`` rebuilds the same structure, e.g. to load a saved
        state dict of a decomposed (and fine-tuned) model.
        """
        return {r.name: (r.rank_out, r.rank_in) for r in self.decomposed}

    def summary(self) -> dict[str, Any]:
        dec = self.decomposed
        before = sum(r.params_before for r in dec)
        after = sum(r.params_after for r in dec)
        conv_before = sum(r.params_before for r in self)
        conv_after = sum(r.params_after for r in self)
        return {
            "spec": self.spec,
            "layers": len(self),
            "decomposed": len(dec),
            "skipped": len(self) - len(dec),
            "decomposed_params_before": before,
            "decomposed_params_after": after,
            "decomposed_fraction": after / before if before else 1.0,
            "conv_params_before": conv_before,
            "conv_params_after": conv_after,
            "conv_fraction": conv_after / conv_before if conv_before else 1.0,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_fraction": self.model_params_after / self.model_params_before if self.model_params_before else 1.0,
            "seconds": self.seconds,
            **({"budget": self.budget} if self.budget is not None else {}),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "layers": [asdict(r) for r in self]}

    def to_json(self, path: str | Path) -> Path:
        from reparam.utils.io import write_json

        return write_json(path, self.as_dict())

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        names = [f.name for f in fields(LayerReport)]
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=names)
            writer.writeheader()
            for r in self:
                writer.writerow(asdict(r))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "TuckerReport":
        data = json.loads(Path(path).read_text())
        s = data["summary"]
        report = cls([LayerReport(**row) for row in data["layers"]], s["model_params_before"],
                     s["model_params_after"], s["seconds"], s.get("spec", ""))
        report.budget = s.get("budget")
        return report

    def table(self) -> str:
        head = ["layer", "shape", "ranks", "params", "after", "rel.err", "note"]
        lines = []
        for r in self:
            shape = (f"{r.in_channels}->{r.out_channels} {r.kernel_size}"
                     + (f" s{r.stride}" if r.stride != "1x1" else ""))
            ranks = f"({r.rank_out},{r.rank_in})" if r.rank_out is not None else "-"
            err = f"{r.rel_error:.4f}" if r.rel_error is not None else "-"
            if r.calib_error_after is not None:  # data-aware: the calibration error, before -> after the fit
                err += f" calib {r.calib_error_before:.2e}->{r.calib_error_after:.2e}"
            lines.append([r.name, shape, ranks, str(r.params_before), str(r.params_after), err, r.reason])
        s = self.summary()
        widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(row) for row in lines]
        out.append(
            f"{s['decomposed']} of {s['layers']} convs decomposed ({s['spec']}): their params "
            f"{s['decomposed_params_before']} -> {s['decomposed_params_after']} ({s['decomposed_fraction']:.1%}); "
            f"model {s['model_params_before']} -> {s['model_params_after']} ({s['model_fraction']:.1%}); "
            f"{s['seconds']:.2f} s")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"TuckerReport({len(self)} layers, {len(self.decomposed)} decomposed)"
