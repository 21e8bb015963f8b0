"""Tests for effsr.shrink: the shrink pipeline, its recipes, resume, argument checks and the demo."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import effsr.shrink.commands  # noqa: F401 - registers `effsr shrink` and `effsr demo`
from effsr import cli, data, inference, models
from effsr.shrink import (ShrinkConfig, VerificationError, build_from_recipe, load_student, read_recipe,
                          save_student, verify_same)
from effsr.shrink.runner import STOP_ENV
from effsr.shrink.recipe import new_recipe
from conftest import write_benchmark_folder

TINY = {"nf": 8, "num_blocks": 2}


#: Small networks: one thread is faster than two fighting for the CPU under pytest -n 2.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random-weight RFDN teacher and small train/eval folders cut from scikit-image's photos."""
    root = tmp_path_factory.mktemp("shrink")
    photos = {p.name: p.hr for p in data.default_images()}
    train = [(f"{n}{i}", np.ascontiguousarray(photos[n][i * 96:i * 96 + 96, 64:192])) for n in ("astronaut", "rocket")
             for i in range(2)]
    evals = [(n, np.ascontiguousarray(photos[n][100:196, 100:228])) for n in ("camera", "coffee")]
    torch.manual_seed(0)
    teacher = models.build("rfdn", **TINY).eval()
    weights = root / "teacher.safetensors"
    save_student(teacher, new_recipe("rfdn", teacher.config), weights)
    return {"root": root, "weights": weights, "train": write_benchmark_folder(root / "train", train),
            "eval": write_benchmark_folder(root / "eval", evals)}


def _argv(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["shrink", "--model", "rfdn", "--weights", str(tiny["weights"]), "--train-data", str(tiny["train"]),
            "--eval-data", str(tiny["eval"]), "--prune", "0.3", "--prune-steps", "2", "--tucker", "0.7",
            "--tucker-min-channels", "4", "--repify", "ecb", "--steps", "2", "--batch-size", "2",
            "--patch-size", "16", "--device", "cpu", "--seed", "3", "--no-peers", "--runtime-trials", "1",
            "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def full_run(tiny) -> Path:
    out = tiny["root"] / "run_full"
    assert cli.main(_argv(tiny, out)) == 0
    return out


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_shrink_writes_every_output(full_run):
    for name in ("student.safetensors", "student.recipe.json", "report.json", "report.md", "frontier.png",
                 "config.json", "log.txt"):
        assert (full_run / name).is_file(), name
    assert (full_run / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = sorted(p.name for p in (full_run / "stages").glob("*.json") if not p.name.endswith(".recipe.json"))
    assert stages == ["0_teacher.json", "1_repify.json", "2_prune.json", "3_fuse.json", "4_tucker.json",
                      "7_report.json"]  # 5 compress, 6 distill: data-aware path only
    report = json.loads((full_run / "report.json").read_text())
    rows = {m["kind"]: m for m in report["models"]}
    teacher, student = rows["teacher"], rows["student"]
    assert student["params"] < teacher["params"] and student["flops"] < teacher["flops"]
    assert set(student["eval"]) == {"eval"}
    for key in ("activations", "convs", "runtime_ms"):
        assert student[key] > 0
    stage = report["stages"]
    assert stage["prune"]["params_after"] < stage["prune"]["params_before"]
    assert stage["fuse"]["had_rep_blocks"] and stage["fuse"]["verify_branches"]["max_rel_error"] <= 1e-4
    assert stage["tucker"]["decomposed"] > 0
    md = (full_run / "report.md").read_text()
    # a random-weight student may be flagged "(below bicubic!)" after its label
    assert "| student" in md and "eval PSNR-Y" in md and f"{student['params']:,}" in md
    assert "| bicubic |" in md and report["bicubic"]["eval"]["psnr_y"] > 0


@pytest.mark.slow
def test_student_reloads_to_the_reported_psnr(full_run, tiny):
    report = json.loads((full_run / "report.json").read_text())
    student_row = next(m for m in report["models"] if m["kind"] == "student")
    net = load_student(full_run / "student.safetensors")
    assert sum(p.numel() for p in net.parameters()) == student_row["params"]
    res = inference.evaluate(net, data.open_dataset(tiny["eval"]), progress=False)
    assert res["psnr_y"] == student_row["eval"]["eval"]["psnr_y"]
    assert res["psnr_rgb"] == student_row["eval"]["eval"]["psnr_rgb"]
    # the recipe alone rebuilds the architecture: same keys and shapes as the saved weights
    recipe = read_recipe(full_run / "student.safetensors")
    assert [op["op"] for op in recipe["ops"]] == ["repify", "prune", "fuse", "tucker"]
    rebuilt = build_from_recipe(recipe)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert json.loads((full_run / "student.recipe.json").read_text()) == recipe


@pytest.mark.slow
def test_effsr_eval_reloads_student(full_run, tiny, tmp_path):
    from effsr.shrink.recipe import load_hook

    student = full_run / "student.safetensors"
    with pytest.raises(ValueError, match="shrunk 'rfdn'"):
        load_hook("rlfn", student)
    assert load_hook("rfdn", tiny["root"] / "missing.safetensors") is None
    # effsr.models.load imports the recipe reader for a file carrying its metadata key: the student loads by name
    from effsr.shrink.recipe import METADATA_KEY

    assert models.LAZY_LOADERS[METADATA_KEY] == "effsr.shrink.recipe:load_hook"
    assert load_hook in models.loaders_for(student) and load_hook not in models.loaders_for(tiny["root"] / "x.pth")
    net = models.load("rfdn", student)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in models.build("rfdn", **TINY).parameters())
    with pytest.raises(ValueError, match="config: .*own architecture"):
        models.load("rfdn", student, nf=8)
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--model", "rfdn", "--weights", str(student), "--data", str(tiny["eval"]),
                     "--json", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    report = json.loads((full_run / "report.json").read_text())
    student_row = next(m for m in report["models"] if m["kind"] == "student")
    assert json.loads(out.read_text())["psnr_y"] == student_row["eval"]["eval"]["psnr_y"]


@pytest.mark.slow
def test_resume_after_interruption_gives_identical_weights(full_run, tiny, monkeypatch, capsys):
    from safetensors.torch import load_file

    out = tiny["root"] / "run_interrupted"
    monkeypatch.setenv(STOP_ENV, "prune")
    assert cli.main(_argv(tiny, out)) == 130  # KeyboardInterrupt after stage 2 was saved
    assert (out / "stages" / "2_prune.safetensors").is_file()
    assert not (out / "stages" / "3_fuse.json").exists() and not (out / "report.json").exists()
    monkeypatch.delenv(STOP_ENV)
    capsys.readouterr()
    # without --resume the folder is refused; with other settings the resume is refused
    assert cli.main(_argv(tiny, out)) == 2
    assert "--resume" in capsys.readouterr().err
    bad = _argv(tiny, out, "--resume")
    bad[bad.index("--prune") + 1] = "0.5"
    assert cli.main(bad) == 2
    assert "different settings" in capsys.readouterr().err
    assert cli.main(_argv(tiny, out, "--resume")) == 0
    assert "reloaded from 2_prune.safetensors" in (out / "log.txt").read_text()
    a = load_file(str(full_run / "student.safetensors"))
    b = load_file(str(out / "student.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((full_run / "report.json").read_text())["models"][1]["eval"]
    rb = json.loads((out / "report.json").read_text())["models"][1]["eval"]
    assert ra == rb


@pytest.mark.slow
def test_ema_decay_reaches_every_fine_tune(tiny, full_run, tmp_path):
    """``--ema-decay`` is passed to each distillation (repify, both pruning rounds, Tucker): the run logs and
    records it per fine-tune, and its student differs from the same run without it."""
    from safetensors.torch import load_file

    out = tmp_path / "ema"
    assert cli.main(_argv(tiny, out, "--ema-decay", "0.5")) == 0
    log = (out / "log.txt").read_text()
    assert log.count("weight average (EMA decay 0.5)") == 4, log
    repify = json.loads((out / "stages" / "1_repify.json").read_text())
    assert json.dumps(repify).count('"ema_decay": 0.5') >= 1
    a = load_file(str(full_run / "student.safetensors"))
    b = load_file(str(out / "student.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("change, expected", [
    (("--model", "srcnn"), "--model"),
    (("--weights", "missing.pth"), "--weights"),
    (("--train-data", "no/such/dir"), "--train-data"),
    (("--eval-data", "no/such/dir"), "--eval-data"),
    (("--prune", "1.0"), "--prune"),
    (("--prune", "-0.1"), "--prune"),
    (("--tucker", "0"), "--tucker"),
    (("--tucker", "1.5"), "--tucker"),
    (("--repify", "nosuchblock"), "--repify"),
    (("--steps", "-1"), "--steps"),
    (("--prune-steps", "0"), "--prune-steps"),
    (("--patch-size", "8"), "--patch-size"),
    (("--model-config", "[1, 2]"), "--model-config"),
    (("--lr-schedule", "linear"), "--lr-schedule"),
    (("--ema-decay", "1"), "--ema-decay"),
    (("--train-minutes", "0"), "--train-minutes"),
    (("--train-minutes", "x"), "--train-minutes"),
])
def test_bad_arguments_fail_before_any_work(tiny, tmp_path, capsys, change, expected):
    out = tmp_path / "never"
    argv = _argv(tiny, out)
    flag, value = change
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0]
    assert not out.exists()


def test_config_validate_names_the_argument(tmp_path):
    """The API's errors name its arguments (the command line's name its flags: test_bad_arguments_fail_...)."""
    base = dict(model="rfdn", weights=str(tmp_path / "w.pth"), train_data="default", eval_data=["default"],
                out=str(tmp_path / "o"))
    ShrinkConfig(**base).validate(check_files=False)
    with pytest.raises(ValueError, match="^weights: "):
        ShrinkConfig(**base).validate()
    with pytest.raises(ValueError, match="^lr must"):
        ShrinkConfig(**base, lr=0.0).validate(check_files=False)
    with pytest.raises(ValueError, match="^eval_data: "):
        ShrinkConfig(**{**base, "eval_data": []}).validate(check_files=False)
    with pytest.raises(ValueError, match="^device"):
        ShrinkConfig(**base, device="tpu:9").validate(check_files=False)
    with pytest.raises(ValueError, match="^lr_schedule: "):
        ShrinkConfig(**base, lr_schedule="linear").validate(check_files=False)
    with pytest.raises(TypeError, match="^channels_last must"):
        ShrinkConfig(**base, channels_last="no").validate(check_files=False)
    for bad in (0.0, 1.0, -0.5, "0.99", True):
        with pytest.raises(ValueError, match="^ema_decay must"):
            ShrinkConfig(**base, ema_decay=bad).validate(check_files=False)


def test_ema_decay_keeps_the_fingerprints_of_earlier_runs_while_off():
    """``--resume`` of a run written before ``ema_decay`` (and block refinement) existed: the fingerprint with
    them off is the one that code computed for the same settings (c3ef9d9a0f8e244b); turning one on changes it."""
    cfg = ShrinkConfig(model="rfdn", weights="", train_data="default", eval_data=["default"], out="o",
                       target_params=1000, method="tucker", steps=5, refine_steps=0)
    assert cfg.fingerprint() == "c3ef9d9a0f8e244b"
    assert cfg.fingerprint(exclude=("steps",)) == "cab01f95173cb6f8"
    assert dataclasses.replace(cfg, refine_steps=200).fingerprint() != cfg.fingerprint()
    on = dataclasses.replace(cfg, ema_decay=0.999)
    assert on.fingerprint() != cfg.fingerprint() != dataclasses.replace(cfg, ema_decay=0.99).fingerprint()


def test_cosine_lr_schedule_decays_every_group_and_resumes_bit_exactly(tmp_path):
    """``--lr-schedule cosine``: every parameter group (a capped small-weight group too) goes from its own lr
    down to COSINE_FLOOR times it over the fine-tune's steps; interrupted and resumed, the run ends with
    the weights of an uninterrupted one (the scheduler's state is checkpointed)."""
    import distill
    from effsr.shrink.config import COSINE_FLOOR
    from effsr.shrink.finetune import lr_scheduler

    assert lr_scheduler("constant", 10) is None
    with pytest.raises(ValueError, match="--lr-schedule"):
        lr_scheduler("step", 10)
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1e-4}, {"params": [params[1]], "lr": 3e-7}])
    sched = lr_scheduler("cosine", 8)(opt)
    seen = []
    for _ in range(8):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    seen.append([g["lr"] for g in opt.param_groups])
    lrs = np.array(seen)
    assert lrs[0] == pytest.approx([1e-4, 3e-7])
    assert lrs[-1] == pytest.approx([1e-4 * COSINE_FLOOR, 3e-7 * COSINE_FLOOR])
    assert np.all(np.diff(lrs, axis=0) < 0) and np.allclose(lrs[:, 1] / lrs[:, 0], 3e-3)

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8, generator=g), torch.rand(8, 3, 8, 8, generator=g))

    def run(ckpt, stop=None):
        torch.manual_seed(0)
        net = torch.nn.Conv2d(3, 3, 3, padding=1)

        def hook(step):
            if step == stop:
                raise KeyboardInterrupt
        distill.train_steps(distill.Supervised(net), ds, steps=6, lr=1e-2, batch_size=2, checkpoint=ckpt,
                            checkpoint_every=100, seed=1, progress=False, on_step=hook,
                            scheduler_fn=lr_scheduler("cosine", 6))
        return net

    ref = run(tmp_path / "ref.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", stop=3)
    resumed = run(tmp_path / "cut.pt")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()))
    # and the schedule matters: a constant lr ends elsewhere
    torch.manual_seed(0)
    const = torch.nn.Conv2d(3, 3, 3, padding=1)
    distill.train_steps(distill.Supervised(const), ds, steps=6, lr=1e-2, batch_size=2, seed=1, progress=False)
    assert not torch.equal(const.weight, ref.weight)


# ------------------------------------------------------------------------------------------ units
def test_verify_same_fails_loudly_on_a_wrong_fusion():
    import reparam

    torch.manual_seed(0)
    net = models.build("rfdn", conv="ecb", **TINY).eval()
    fused = reparam.fuse_all(net)
    x = [torch.rand(1, 3, 24, 24) * 255]
    assert verify_same(net, fused, x, "fuse", 1e-4)["max_rel_error"] <= 1e-4
    with torch.no_grad():
        fused.upsampler[0].bias += 1.0
    with pytest.raises(VerificationError, match="fuse.*max relative error"):
        verify_same(net, fused, x, "fuse", 1e-4)


def test_recipe_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="effsr_recipe"):
        load_student(plain)
    with pytest.raises(ValueError, match="unknown recipe op|not one of"):
        build_from_recipe({**new_recipe("rfdn", TINY), "ops": [{"op": "quantize"}]})
    with pytest.raises(ValueError, match="format"):
        build_from_recipe({"format": "other", "arch": "rfdn", "config": {}, "ops": []})


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--teacher-steps", "3", "--steps", "1", "--nf", "8",
                     "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "student" in printed and "skimage PSNR-Y" in printed
    report = json.loads((out / "report.json").read_text())
    kinds = [m["kind"] for m in report["models"]]
    assert kinds == ["teacher", "student"]
    assert report["models"][1]["params"] < report["models"][0]["params"]
    # the demo's student: data-aware path to <= 50 % of the teacher's params, then distillation
    assert report["models"][1]["params"] <= 0.5 * report["models"][0]["params"]
    assert report["stages"]["compress"]["chosen"] in ("prune", "tucker")
    assert report["stages"]["distill"]["finetune"]["steps"] == 1
    for name in ("teacher.safetensors", "student.safetensors", "report.md", "frontier.png"):
        assert (out / name).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["prune:2:1", "tucker:0:1"])
def test_resume_inside_a_stage_continues_where_it_stopped(full_run, tiny, monkeypatch, capsys, stop):
    """Interrupted in the middle of a distillation (round 2 of pruning, or Tucker's): --resume continues
    from that step's checkpoint and ends with the very weights of the uninterrupted run."""
    from safetensors.torch import load_file

    from effsr.shrink.finetune import STOP_STEP_ENV

    stage = stop.split(":")[0]
    out = tiny["root"] / f"run_mid_{stage}"
    monkeypatch.setenv(STOP_STEP_ENV, stop)
    assert cli.main(_argv(tiny, out)) == 130
    partial = list((out / "stages" / "partial").rglob("finetune_*.pt"))
    assert partial, "no mid-stage checkpoint written"
    assert any(torch.load(p, weights_only=True)["step"] == 1 for p in partial)
    assert not (out / "stages" / f"{ {'prune': 2, 'tucker': 4}[stage]}_{stage}.json").exists()
    monkeypatch.delenv(STOP_STEP_ENV)
    assert cli.main(_argv(tiny, out, "--resume")) == 0
    capsys.readouterr()
    assert "(resumed at step 1)" in (out / "log.txt").read_text()
    assert not (out / "stages" / "partial").exists()  # removed once the stage was saved
    a = load_file(str(full_run / "student.safetensors"))
    b = load_file(str(out / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_demo_teacher_training_resumes_mid_training(tmp_path, monkeypatch, capsys):
    """The demo teacher's training checkpoints inside the run: interrupted at step 2 of 4 and resumed, it
    gives the teacher an uninterrupted training gives (both runs stop once the teacher stage is saved)."""
    from safetensors.torch import load_file

    from effsr.shrink.finetune import STOP_STEP_ENV

    argv = ["demo", "--teacher-steps", "4", "--steps", "1", "--nf", "8", "--no-progress"]
    monkeypatch.setenv(STOP_ENV, "teacher")
    assert cli.main([*argv, "--out", str(tmp_path / "ref")]) == 130
    cut = tmp_path / "cut"
    monkeypatch.setenv(STOP_STEP_ENV, "teacher_training:0:2")
    assert cli.main([*argv, "--out", str(cut)]) == 130
    ckpt, = cut.glob(".teacher_training-*.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 2 and not (cut / "teacher.safetensors").exists()
    monkeypatch.delenv(STOP_STEP_ENV)
    assert cli.main([*argv, "--out", str(cut), "--resume"]) == 130
    capsys.readouterr()
    assert "resumed training at step 2" in (cut / "log.txt").read_text()
    assert not list(cut.glob(".teacher_training-*.pt"))
    a, b = load_file(str(tmp_path / "ref" / "teacher.safetensors")), load_file(str(cut / "teacher.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_minutes_budget_ends_each_fine_tune_and_is_recorded(tiny, tmp_path):
    """``--train-minutes``: without ``--steps`` each fine-tune runs until its time budget (here a tiny one, so
    every fine-tune stops after its first step or few), logs that the budget ended it and records it; the
    fingerprint of a run without a budget is unchanged by the new setting."""
    out = tmp_path / "budget"
    argv = _argv(tiny, out, "--train-minutes", "0.0002")
    i = argv.index("--steps")
    del argv[i:i + 2]
    assert cli.main(argv) == 0
    log = (out / "log.txt").read_text()
    assert log.count("the --train-minutes 0.0002 budget reached") == 4, log  # repify, 2 pruning rounds, Tucker
    ft = json.loads((out / "stages" / "4_tucker.json").read_text())["result"]["finetune"]
    assert ft["out_of_time"] and 1 <= ft["steps"] < 1000 and ft["train_seconds"] >= 0.012
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_minutes"] == 0.0002 and cfg["steps"] == 1_000_000
    base = dict(model="rfdn", weights="", train_data="default", eval_data=["default"], out="o")
    assert ShrinkConfig(**base).fingerprint() == ShrinkConfig(**base, steps=100).fingerprint()
    assert ShrinkConfig(**base, train_minutes=5).fingerprint() != ShrinkConfig(**base).fingerprint()


@pytest.mark.parametrize("kw, match", [
    ({"train_minutes": 0}, "^train_minutes"), ({"train_minutes": -1.0}, "^train_minutes"),
    ({"train_minutes": float("inf")}, "^train_minutes"), ({"train_minutes": "5"}, "^train_minutes"),
    ({"train_minutes": 5, "lr_schedule": "cosine"}, "^lr_schedule"),
])
def test_train_minutes_bad_values_name_the_argument(tmp_path, kw, match):
    base = dict(model="rfdn", weights=str(tmp_path / "w.pth"), train_data="default", eval_data=["default"],
                out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=match):
        ShrinkConfig(**base, **kw).validate(check_files=False)
