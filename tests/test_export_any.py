"""effsr.export on networks it has never seen: a graph that depends on the input size is refused with its
cause or exported at a fixed size, verify runs a fixed-size graph on any image, foreign rep blocks are fused
first."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from effsr import data, export  # noqa: E402
from effsr.export.onnx import CHECK_TOLERANCE  # noqa: E402

# ONNX export and onnxruntime sessions: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow


class SizeAttention(nn.Module):
    """Attention from a max-pool whose output size is computed from the input size (as SAFMN does)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        a = self.conv(F.adaptive_max_pool2d(x, (h // 8, w // 8)))
        return x * torch.sigmoid(F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False))


class GlobalAttention(nn.Module):
    """Attention from a global pool: the pooled size does not depend on the input size."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(F.adaptive_avg_pool2d(x, 1)))


class Branches(nn.Module):
    """A 3x3 and a 1x1 conv in parallel, and how to merge them into one 3x3 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.k3, self.k1 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deploy(x) if hasattr(self, "deploy") else self.k3(x) + self.k1(x)

    def merge_into_one(self, with_1x1: bool) -> None:
        conv = nn.Conv2d(self.k3.in_channels, self.k3.out_channels, 3, padding=1)
        conv.weight.copy_(self.k3.weight)
        conv.bias.copy_(self.k3.bias)
        if with_1x1:
            conv.weight[:, :, 1, 1] += self.k1.weight[:, :, 0, 0]
            conv.bias += self.k1.bias
        self.deploy = conv
        del self.k3, self.k1


class DeployBranches(Branches):
    def switch_to_deploy(self) -> None:
        self.merge_into_one(with_1x1=True)


class WrongFuse(Branches):
    def fuse(self) -> None:  # forgets the 1x1 branch: a different network, to be undone
        self.merge_into_one(with_1x1=False)


class TinySR(nn.Module):
    """A user's x4 network in [0, 1]: head conv, attention (optional foreign rep blocks), PixelShuffle."""

    def __init__(self, attention: type[nn.Module], c: int = 8, foreign: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        body: dict[str, nn.Module] = {"attn": attention(c)}
        if foreign:
            body.update(rep=DeployBranches(c), bad=WrongFuse(c))
        self.body = nn.Sequential()
        for name, m in body.items():
            self.body.add_module(name, m)
        self.tail = nn.Conv2d(c, 3 * 16, 3, padding=1)
        self.up = nn.PixelShuffle(4)
        self.scale, self.input_range = 4, 1.0
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.tail(self.body(self.head(x)))) + F.interpolate(x, scale_factor=4, mode="nearest")


def input_dims(path: Path) -> list[int | str]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def run(path: Path, x: torch.Tensor) -> np.ndarray:
    return export.OnnxSR(path).run_numpy(x.numpy())


def rel(out: np.ndarray, ref: torch.Tensor) -> float:
    return float(np.abs(out - ref.numpy()).max() / ref.abs().max())


def baked_reshape_graph(path: Path, h: int, w: int) -> None:
    """An identity graph whose input is declared dynamic but which reshapes to ``1 x 3 x h x w`` inside."""
    from onnx import TensorProto, helper

    lr = helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["n", 3, "h", "w"])
    sr = helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, h, w])
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [1, 3, h, w])
    node = helper.make_node("Reshape", ["lr", "shape"], ["sr"])
    graph = helper.make_graph([node], "baked", [lr], [sr], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


class Identity(nn.Module):
    scale, input_range = 1, 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


@pytest.fixture(scope="module")
def images():
    return data.default_images()[:2]


# ------------------------------------------------------------------------------------ size-dependent graphs
def test_a_size_dependent_graph_is_refused_naming_the_cause_and_nothing_is_written(tmp_path) -> None:
    net = TinySR(SizeAttention)
    kept = tmp_path / "kept.onnx"
    kept.write_bytes(b"an earlier file")
    for path in (tmp_path / "new.onnx", kept):
        with pytest.raises(ValueError) as err:
            export.to_onnx(net, path)
        text = str(err.value)
        assert "\n" not in text and text.startswith("model: ")
        assert "depends on the input size H/W" in text and "input_size=(H, W)" in text
        assert "its input is fixed at the trace size 32x40" in text
        assert "body.attn (SizeAttention" in text and "adaptive_max_pool2d" in text  # the module responsible
    assert not (tmp_path / "new.onnx").exists() and kept.read_bytes() == b"an earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.onnx"]


def test_a_fixed_size_export_records_the_size_and_verifies_on_images_of_any_size(tmp_path, images) -> None:
    net = TinySR(SizeAttention)
    path = export.to_onnx(net, tmp_path / "fixed.onnx", input_size=(24, 32))
    assert isinstance(path, Path) and path == tmp_path / "fixed.onnx"
    assert path.info["dynamic"] is False and path.info["static_input"] == [24, 32]
    assert path.info["batch"] == "dynamic" and path.info["check"]["max_rel_error"] <= 1e-5
    assert export.read_meta(path) == {"arch": "TinySR", "scale": "4", "input_range": "1.0",
                                      "static_input": "24x32"}
    assert input_dims(path)[1:] == [3, 24, 32]
    # 128 x 128 photos (cropped), a smaller image (tiled) and a batch of a larger odd-sized one.
    g = torch.Generator().manual_seed(3)
    others = [*images, torch.rand(3, 17, 20, generator=g), torch.rand(2, 3, 51, 45, generator=g)]
    result = export.verify(net, path, others)
    assert result["passed"] and result["max_rel_error"] <= export.FP32_TOLERANCE
    assert result["static_input"] == [24, 32]
    assert [r["shape"] for r in result["per_image"]] == [[1, 3, 24, 32]] * 3 + [[2, 3, 24, 32]]
    assert result["batch"]["shape"] == [2, 3, 24, 32]
    with torch.no_grad():  # the graph is the network at that size
        x = torch.rand(1, 3, 24, 32, generator=g)
        assert rel(run(path, x), net(x)) <= 1e-5


def test_a_dynamic_network_still_exports_a_dynamic_graph(tmp_path) -> None:
    net = TinySR(GlobalAttention)
    path = export.to_onnx(net, tmp_path / "dyn.onnx")
    assert path.info["dynamic"] is True and path.info["static_input"] is None
    assert path.info["batch"] == "dynamic"
    assert export.read_meta(path) == {"arch": "TinySR", "scale": "4", "input_range": "1.0"}
    assert isinstance(input_dims(path)[2], str) and isinstance(input_dims(path)[3], str)
    sizes = [s[2:] for s in path.info["check"]["sizes"]]
    assert [32, 40] in sizes and any(h % 2 and w % 2 for h, w in sizes)  # trace size and odd sizes ran
    g = torch.Generator().manual_seed(4)
    for shape in [(1, 3, 19, 27), (2, 3, 33, 16)]:
        x = torch.rand(shape, generator=g)
        with torch.no_grad():
            assert rel(run(path, x), net(x)) <= 1e-5


def test_verify_turns_an_onnxruntime_failure_into_one_value_error(tmp_path, images) -> None:
    """A graph whose input is declared dynamic but which reshapes to a size fixed inside the graph."""
    path = tmp_path / "baked.onnx"
    baked_reshape_graph(path, 64, 64)
    with pytest.raises(ValueError) as err:
        export.verify(TinySR(GlobalAttention), path, images)
    text = str(err.value)
    assert text.startswith(f"onnx_path: onnxruntime cannot run {path} on astronaut [1, 3, 128, 128]: ")
    assert "\n" not in text


def test_a_graph_with_dynamic_inputs_that_fails_at_other_sizes_is_refused(tmp_path, monkeypatch) -> None:
    """The input looks dynamic, but the graph only runs at the trace size: the run at other sizes finds it."""
    def exporter(model, args, f, **kwargs):
        baked_reshape_graph(Path(f), *args[0].shape[-2:])

    monkeypatch.setattr(torch.onnx, "export", exporter)
    with pytest.raises(ValueError, match=r"at 17x23 onnxruntime fails: .*input_size=\(H, W\)") as err:
        export.to_onnx(Identity(), tmp_path / "x.onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "x.onnx").exists()


def test_input_size_is_checked(tmp_path) -> None:
    net = TinySR(GlobalAttention)
    for bad in ("24x32", (24.0, 32), (24,), (True, 32)):
        with pytest.raises(TypeError, match="input_size"):
            export.to_onnx(net, tmp_path / "x.onnx", input_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_size"):
        export.to_onnx(net, tmp_path / "x.onnx", input_size=(0, 32))
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------------------------ foreign rep blocks
def test_foreign_rep_blocks_are_fused_before_export_and_reported(tmp_path, images) -> None:
    net = TinySR(GlobalAttention, foreign=True)
    path = export.to_onnx(net, tmp_path / "foreign.onnx")
    foreign = path.info["foreign"]
    assert [(m["name"], m["cls"], m["method"]) for m in foreign["fused"]] == [
        ("body.rep", "DeployBranches", "switch_to_deploy")]
    [bad] = foreign["unfused"]
    assert (bad["name"], bad["method"]) == ("body.bad", "fuse")
    assert "changed the model's output" in bad["reason"]
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    # head, attention, rep (one conv, fused), bad (both branches, left as they are), tail
    assert len(convs) == 1 + 1 + 1 + 2 + 1
    assert export.verify(net, path, images)["passed"]  # the graph computes the network as given
    assert hasattr(net.body.rep, "k1")  # the user's network is not changed


# ------------------------------------------------------------------------------------ the NTIRE networks
def _ntire_entries() -> list[dict]:
    from conftest import shared_data_dir

    shared = shared_data_dir()
    listing = shared / "ntire2024" / "networks.json" if shared is not None else None
    if listing is None or not listing.is_file():
        return []
    root = listing.parent
    return [{**e, "root": root} for e in json.loads(listing.read_text())["networks"]]


NTIRE = _ntire_entries()


def load_user_network(e: dict) -> nn.Module:
    """The network as a user brings it: its Python file, class, constructor arguments and checkpoint."""
    spec = importlib.util.spec_from_file_location(f"user_network_{e['name']}", e["root"] / e["file"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = getattr(module, e["cls"])(**e["kwargs"])
    state = torch.load(e["root"] / e["checkpoint"], map_location="cpu", weights_only=True)
    net.load_state_dict(state[e["state_dict_key"]] if e["state_dict_key"] else state, strict=True)
    net.scale, net.input_range = int(e["scale"]), float(e["input_range"])
    return net.eval()


@pytest.mark.data
@pytest.mark.skipif(not NTIRE, reason="ntire2024 networks not found in the shared data (set EFFSR_DATA)")
@pytest.mark.parametrize("entry", NTIRE, ids=[e["name"] for e in NTIRE])
def test_published_networks_export_to_a_verified_fp32_graph(entry, tmp_path, images, one_thread) -> None:
    net = load_user_network(entry)
    try:
        path = export.to_onnx(net, tmp_path / "net.onnx")
    except ValueError as err:  # a graph that depends on the input size: the fixed-size path
        assert "input_size=(H, W)" in str(err) and "\n" not in str(err)
        assert not (tmp_path / "net.onnx").exists()
        path = export.to_onnx(net, tmp_path / "net.onnx", input_size=(48, 64))
        assert path.info["static_input"] == [48, 64] and export.read_meta(path)["static_input"] == "48x64"
    else:
        assert path.info["dynamic"] and "static_input" not in export.read_meta(path)
        assert path.info["check"]["max_rel_error"] <= CHECK_TOLERANCE
    result = export.verify(net, path, images)
    assert result["passed"] and result["max_rel_error"] <= export.FP32_TOLERANCE


def test_verify_measures_against_float64_where_float32_pytorch_is_itself_off(tmp_path, images) -> None:
    """A network whose float32 forward carries a rounding-sized error of 1e-4 that its float64 forward does
    not: a graph of the exact network passes (it matches float64), a graph of another network does not."""

    class Imprecise(TinySR):
        noisy = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            if self.noisy and y.dtype == torch.float32:
                y = y + 1e-4 * y.abs().max() * torch.cos(torch.arange(y.shape[-1], dtype=y.dtype))
            return y

    net = Imprecise(GlobalAttention)
    path = export.to_onnx(net, tmp_path / "exact.onnx")
    other = export.to_onnx(Imprecise(GlobalAttention, seed=1), tmp_path / "other.onnx")
    net.noisy = True
    result = export.verify(net, path, images)
    assert result["passed"] and result["max_rel_error"] <= export.FP32_TOLERANCE
    for row in result["per_image"]:
        assert row["rel_error"] > 5e-5 and row["rel_error_fp64"] <= 1e-5 and row["torch_fp32_error"] > 5e-5
    with pytest.raises(export.ExportMismatchError, match="against float64 PyTorch"):
        export.verify(net, other, images)


SIZE_NET_CODE = '''
import torch
import torch.nn.functional as F
from torch import nn


class PoolSR(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.tail = nn.Conv2d(c, 48, 3, padding=1)
        self.up = nn.PixelShuffle(4)

    def forward(self, x):
        f = self.head(x)
        h, w = f.shape[-2:]
        a = self.conv(F.adaptive_max_pool2d(f, (h // 8, w // 8)))
        f = f * torch.sigmoid(F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False))
        return self.up(self.tail(f))
'''


def test_cli_export_fixed_size_for_a_size_dependent_graph(tmp_path, capsys):
    from effsr import cli, models

    code_file = tmp_path / "pool_sr.py"
    code_file.write_text(SIZE_NET_CODE)
    torch.manual_seed(0)
    net = models.open_model(f"{code_file}:PoolSR", input_range=1.0)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    base = ["export", "--model", f"{code_file}:PoolSR", "--weights", str(tmp_path / "w.pth"), "--input-range", "1",
            "--eval-data", "default", "--max-eval-images", "1", "--runtime-trials", "1", "--no-progress"]
    out = tmp_path / "dyn"
    assert cli.main([*base, "--out", str(out)]) == 2
    err = capsys.readouterr()[1]
    assert len(err.strip().splitlines()) == 1 and "export at a fixed size with --input-size H W" in err
    assert not out.exists()
    out = tmp_path / "fixed"
    assert cli.main([*base, "--input-size", "48", "40", "--int8", "--calib-data", "default", "--calib-count", "4",
                     "--out", str(out)]) == 0
    capsys.readouterr()
    rep = json.loads((out / "export.json").read_text())
    assert rep["onnx"] == {"dynamic": False, "static_input": [48, 40]}
    assert export.OnnxSR(out / "PoolSR.onnx").static_input == (48, 40)
    assert export.OnnxSR(out / "PoolSR.int8.onnx").static_input == (48, 40)  # calibrated at 48x40 too
    v = rep["variants"]
    assert v["onnx_fp32"]["eval"]["default"]["psnr_y"] == pytest.approx(v["torch_fp32"]["eval"]["default"]["psnr_y"],
                                                                        abs=0.5)


@pytest.mark.parametrize("h,w", [(48, 40), (17, 23), (100, 41), (48, 130)])
def test_windowed_equals_whole_for_a_local_network(h, w):
    """A network whose output pixel depends on a 5x5 neighbourhood: the windows' owned parts (>= 8 px from an
    inner window edge) reproduce the whole-image output (float64, up to summation order)."""
    from effsr.export.session import windowed

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2))
    x = torch.rand(1, 3, h, w, dtype=torch.float64)
    net = net.double()

    def fixed(t):
        assert tuple(t.shape[-2:]) == (32, 24)
        return net(t)

    padded = F.pad(x, (0, max(24 - w, 0), 0, max(32 - h, 0)), mode="replicate")
    ref = net(padded)[..., : 2 * h, : 2 * w]
    torch.testing.assert_close(windowed(fixed, x, (32, 24), 2), ref, rtol=0, atol=1e-12)
