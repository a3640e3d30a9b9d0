"""training.config, the run folder and the CLI: a toy run end to end, SIGKILL then resume bit for bit, and
refusals that name the config field at fault."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from training import cli
from training import config as cfg
from training.run_dir import read_state

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "training" / "examples" / "toy.toml"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# tiny toy runs: two styles, two clips per style, an MSE stage (32->8) and an adversarial one (8->4, D then D')
TINY = ["model.bases=[0, 1]", "stage.clips=2", "stage.micro_batch=1", "run.threads=1", "checkpoint.every=1",
        "checkpoint.keep=2", "validation.every=0"]
STAGES = {"mse": ["stage.name=\"32->8\"", "stage.iterations=3", "stage.lr=1e-2"],
          "adversarial": ["stage.name=\"8->4\"", "stage.iterations=2", "stage.lr=5e-4"]}


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


# --- config ---------------------------------------------------------------------------------------------

def test_example_configs_load_and_round_trip(tmp_path):
    toy = cfg.load(TOY)
    assert toy.model.kind == "toy" and toy.stage.name == "8->4" and toy.run.threads == 1
    sd15 = cfg.load(REPO / "training" / "examples" / "sd15_cross_model.toml")
    assert sd15.model.kind == "sd15" and len(sd15.model.bases) >= 2 and sd15.stage.name == "8->4"
    for config in (toy, sd15):
        path = tmp_path / "c.toml"
        path.write_text(cfg.dumps(config))
        assert cfg.load(path) == config


def test_overrides_are_typed_and_errors_name_the_key(tmp_path):
    config = cfg.load(TOY, ["stage.iterations=7", "run.device=cpu", "stage.lr=1e-3", "model.bases=[2]",
                            "stage.mse_only=true"])
    assert (config.stage.iterations, config.run.device, config.stage.lr, config.model.bases,
            config.stage.mse_only) == (7, "cpu", 1e-3, [2], True)
    for item, words in (("stage.iterations=many", "stage.iterations"), ("stage.clip=2", "stage.clips"),
                        ("nosuch.key=1", "nosuch.key"), ("stage.mse_only=1", "true or false"),
                        ("run.precision=fp8", "run.precision"), ("stage.clips=3", "stage.micro_batch"),
                        ("stage.iterations", "section.key=value")):
        with pytest.raises(cfg.ConfigError, match=words.replace(".", r"\.")):
            cfg.load(TOY, [item.replace("stage.clips=3", "stage.clips=3")] + (["stage.micro_batch=2"]
                                                                              if item == "stage.clips=3" else []))
    bad = tmp_path / "bad.toml"
    bad.write_text("[stage]\nname = \"8->4\"\nlr = \"fast\"\n")
    with pytest.raises(cfg.ConfigError, match=r"stage\.lr = 'fast' must be a number"):
        cfg.load(bad)


def test_resume_check_names_fields_that_change_the_run():
    saved = cfg.load(TOY)
    grown = cfg.apply_overrides(saved, ["stage.iterations=500", "checkpoint.every=7", "validation.every=3",
                                        "model.resident_bases=one", "run.device=cpu"])
    assert cfg.resume_conflicts(saved, grown, completed_iterations=20) == []
    for item, field in (("stage.clips=8", "stage.clips"), ("run.seed=1", "run.seed"), ("model.bases=[0, 1]",
                        "model.bases"), ("stage.name=\"4->2\"", "stage.name"), ("run.precision=bf16",
                        "run.precision"), ("stage.iterations=5", "stage.iterations")):
        overrides = [item] + (["stage.micro_batch=8"] if field == "stage.clips" else [])
        problems = cfg.resume_conflicts(saved, cfg.apply_overrides(saved, overrides), completed_iterations=20)
        assert len(problems) == 1 + (field == "stage.clips") and problems[0].startswith(field), problems


# --- the CLI end to end -----------------------------------------------------------------------------------

def run_cli(argv, capsys=None, **kwargs):
    code = cli.main(argv, handle_signals=False, **kwargs)
    return code


def test_cli_runs_the_toy_example_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    code = run_cli(["run", str(TOY), "--run-dir", str(run), "--seed", "3"] + sets(
        TINY + ["stage.iterations=2", "validation.every=4", "checkpoint.every=3"]))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0] == str(run)  # the run folder comes first
    assert "4/4" in err and "d=" in err and "g=" in err  # the progress lines with loss figures
    config = cfg.load(run / "config.toml")
    assert config.run.seed == 3 and config.stage.iterations == 2
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    iterations = [r for r in records if "event" not in r]
    assert [r["phase"] for r in iterations] == ["conditional"] * 2 + ["unconditional"] * 2
    assert all({"d", "g", "accuracy", "preference", "lr", "seconds", "clips_drawn"} <= set(r) for r in iterations)
    validation = [r for r in records if r.get("event") == "validation"]
    assert len(validation) == 1 and len(validation[0]["clips"]) == 2  # one clip per base
    folder = run / validation[0]["folder"]
    assert (folder / "grid.png").is_file() and len(list(folder.glob("*.mp4"))) == 4  # student + teacher per base
    assert all(c["student"]["flicker"] >= 0 and c["teacher"]["warp_error"] is not None for c in validation[0]["clips"])
    # the student in the original layout (both positional tables per module), with the step count our loader
    # reads; the toy's one-level set is no SD1.5 module, so it is read back by key into a fresh toy module
    from safetensors import safe_open

    from lightning.checkpoints import lightning_steps_from
    from lightning.toy.models import make_motion_module

    with safe_open(str(run / "students" / "toy_4step.safetensors"), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert lightning_steps_from(None, metadata) == 4 and metadata["lightning_steps"] == "4"
    assert metadata["adlightning.stage"] == "8->4" and json.loads(metadata["adlightning.bases"]) == ["0", "1"]
    assert metadata["adlightning.iterations"] == "4"
    module = make_motion_module()
    module.load_state_dict({k: v for k, v in tensors.items() if ".pos_encoder." not in k})  # strict
    assert [p.name for p in sorted((run / "state").iterdir())] == ["iter-00000003.safetensors",
                                                                   "iter-00000004.safetensors"]
    _, meta = read_state(run / "state" / "iter-00000004.safetensors")
    assert meta["iteration"] == 4 and meta["phase"] is None  # the stage is over


def test_cli_refuses_a_missing_config_and_a_used_run_folder(tmp_path, capsys):
    assert run_cli(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert run_cli(["run", str(TOY), "--run-dir", str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_without_opencv_or_bitsandbytes_refuses_before_a_run_folder_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    run = tmp_path / "run"
    assert run_cli(["run", str(TOY), "--run-dir", str(run)] + sets(TINY + ["validation.every=4"])) == 2
    err = capsys.readouterr().err
    assert "needs OpenCV" in err and "validation.every" in err and "pip install" in err, err
    assert not run.exists()
    # 8-bit Adam without bitsandbytes: refused the same way, before anything exists
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert run_cli(["run", str(TOY), "--run-dir", str(run)] + sets(
        TINY + ["validation.every=0", "stage.optimizer=\"adam8bit\""])) == 2
    err = capsys.readouterr().err
    assert "needs the bitsandbytes package" in err and "adam" in err, err
    assert not run.exists()
    # with validation off the same run needs no OpenCV
    assert run_cli(["run", str(TOY), "--run-dir", str(run)] + sets(
        TINY + ["validation.every=0", "stage.iterations=1"])) == 0, capsys.readouterr().err


# --- SIGKILL and resume: bit for bit ----------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    from training import cli

    kill_at = int(sys.argv[1])

    def killer(event, record, trainer):
        if event == "iteration" and record["iteration"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no chance to save: the newest state is kill_at - 1's

    sys.exit(cli.main(sys.argv[2:], hooks=[killer]))
""")


def final_state(run: Path):
    return read_state(sorted((run / "state").glob("iter-*.safetensors"))[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mse", "adversarial"])
def test_sigkill_then_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, capsys, kind):
    overrides = sets(TINY + STAGES[kind])
    total = 3 if kind == "mse" else 4
    reference = tmp_path / "reference"
    assert run_cli(["run", str(TOY), "--run-dir", str(reference)] + overrides) == 0

    kill_at = random.Random(f"{kind}-{os.getpid()}").randint(2, total - 1)
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), "run", str(TOY), "--run-dir", str(killed)]
                          + overrides, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    states = sorted((killed / "state").glob("iter-*.safetensors"))
    assert states and states[-1].name == f"iter-{kill_at - 1:08d}.safetensors"
    for path in states:
        read_state(path)  # every visible state file is whole
    capsys.readouterr()

    assert run_cli(["resume", str(killed)]) == 0, capsys.readouterr().err
    assert not [p for p in killed.rglob("*") if ".partial" in p.name]  # nothing half-written left behind
    (want, want_meta), (got, got_meta) = final_state(reference), final_state(killed)
    assert want.keys() == got.keys()
    assert any(k.startswith("optimizer.student.") for k in got) and any(k.startswith("student.") for k in got)
    if kind == "adversarial":
        assert any(k.startswith("discriminator.") for k in got)
        assert any(k.startswith("optimizer.discriminator.") for k in got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    for field in ("iteration", "phase_index", "step", "optimizers", "python_random", "numpy_random"):
        assert want_meta[field] == got_meta[field], field
    log = lambda run: [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(log(killed)) == strip(log(reference))  # the same losses, iteration by iteration

    # a field that changes what the run computes is refused on resume, by name
    config_path = killed / "config.toml"
    config_path.write_text(config_path.read_text().replace("clips = 2", "clips = 4"))
    assert run_cli(["resume", str(killed)]) == 2
    err = capsys.readouterr().err
    assert "stage.clips changed from 2 to 4" in err


def test_an_error_inside_an_iteration_saves_the_last_whole_state_and_resume_stays_exact(tmp_path):
    """Out of memory while drawing iteration 2 (before any optimiser step): the state after iteration 1 is
    saved with the random states of that moment, and a resume from it ends where a run without the error ends."""
    from training import toy_setup
    from training.loop import Trainer, pinned_threads
    from training.run_dir import RunDir, restore_state

    config = cfg.load(TOY, ["model.bases=[0]", "stage.clips=1", "stage.micro_batch=1", "stage.iterations=2", "run.threads=1",
                            "checkpoint.every=0", "validation.every=0"])

    def trainer(folder, fail_on_call=None, resume=False):
        cli._seed_everything(config.run.seed)
        setup = toy_setup.build(config)
        lane = setup.lanes[0]
        draw, calls = lane.data, []

        def data(n, generator):
            calls.append(n)
            if len(calls) == fail_on_call:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return draw(n, generator)

        lane.data = data
        run = RunDir.open(folder) if resume else RunDir.create(config, folder)
        return Trainer(setup, config, run_dir=run), run

    with pinned_threads(1):
        reference, _ = trainer(tmp_path / "reference")
        reference.run()
        failing, run = trainer(tmp_path / "failing", fail_on_call=2)
        with pytest.raises(torch.OutOfMemoryError):
            failing.run()
        assert [p.name for p in run.state_files()] == ["iter-00000001.safetensors"]
        resumed, run = trainer(tmp_path / "failing", resume=True)
        restore_state(resumed, run.latest_state())
        resumed.run()
    (want, _), (got, _) = final_state(tmp_path / "reference"), final_state(tmp_path / "failing")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_sigterm_saves_after_the_current_iteration_and_says_how_to_resume(tmp_path):
    script = KILLER.replace("signal.SIGKILL", "signal.SIGTERM")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, "1", "run", str(TOY), "--run-dir", str(run)]
                          + sets(TINY + STAGES["mse"]), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == cli.EXIT_INTERRUPTED, proc.stderr
    assert "SIGTERM" in proc.stderr and f"python -m training resume {run}" in proc.stderr
    _, meta = read_state(run / "state" / "iter-00000001.safetensors")
    assert meta["iteration"] == 1 and (run / "students" / "toy_8step.safetensors").is_file()


def test_toy_setup_on_meta_reads_and_allocates_nothing():
    from training import toy_setup

    setup = toy_setup.build(cfg.load(TOY, ["model.bases=[0, 2]"]), materialize=False)
    assert [lane.index for lane in setup.lanes] == [0, 2]
    modules = [setup.student, setup.make_discriminator(True)] + [lane.base for lane in setup.lanes]
    assert all(t.is_meta for m in modules for t in list(m.parameters()) + list(m.buffers()))
