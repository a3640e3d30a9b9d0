"""``python -m training run | resume | estimate | dataset``.

    python -m training run CONFIG.toml [--run-dir DIR] [--seed S] [--set section.key=value ...]
    python -m training resume RUN_DIR [--set section.key=value ...]
    python -m training estimate CONFIG.toml ...     (the memory plan, training.memory)
    python -m training dataset ...                  (latent caches, training.dataset)

``run`` prints the run folder first, then one progress line per iteration on stderr (a bar redrawn in place
on a terminal). Ctrl-C or SIGTERM finishes the current iteration, saves the state and exits with 130;
``resume`` continues from the newest state in the folder, exactly where it stopped.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import signal
import sys
import time

import numpy as np
import torch

from ._core import core
LightningError = core("errors").LightningError

from . import config as config_module
from . import distributed, validation
from .loop import require_optimizer
from .config import Config, ConfigError

EXIT_INTERRUPTED = 130


def setup_builder(config: Config):
    """The module whose ``build(config, materialize=True)`` makes the run's Setup (imported lazily)."""
    name = {"toy": "training.toy_setup", "sd15": "training.sd15_setup"}[config.model.kind]
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise LightningError(f"model.kind = {config.model.kind!r} needs {name}, which could not be imported "
                             f"({error}); SD1.5 runs on ComfyUI's model code: install this pack inside ComfyUI's "
                             "custom_nodes or set COMFYUI_PATH") from None


def build_setup(config: Config, *, materialize: bool = True):
    """The :class:`~training.loop.Setup` for ``config.model.kind`` (toy here; sd15 through ComfyUI)."""
    return setup_builder(config).build(config, materialize=materialize)


class Progress:
    """One line per iteration: a bar redrawn in place on a terminal, plain lines otherwise (logs, CI)."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()

    def __call__(self, record: dict) -> None:
        self.count = getattr(self, "count", 0) + 1
        done = record["iteration"]
        figures = " ".join(f"{k}={record[k]:.4g}" for k in ("mse", "d", "g", "accuracy", "preference") if k in record)
        rate = (time.perf_counter() - self.started) / self.count
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        line = (f"[{bar}] {done}/{self.total} {record['stage']} {record['phase']} step {record['step']} "
                f"{figures} {rate:.2f}s/it")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _install_signals(trainer) -> dict:
    """SIGINT/SIGTERM ask the trainer to stop after the current iteration (a second SIGINT stops at once)."""
    previous = {}

    def ask(signum, frame):
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        print(f"\n{signal.Signals(signum).name}: saving after this iteration (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, ask)
    return previous


def _train(config: Config, run_dir, *, state=None, handle_signals: bool, hooks=(), out=None, world=None,
           device=None) -> int:
    from .loop import Interrupted, pinned_threads
    from .run_dir import restore_state

    # training.distributed: one process is World(); under torchrun every rank runs this, rank 0 writes
    world = world or distributed.World()
    main = world.is_main
    out = out or sys.stdout
    if main:
        print(os.fspath(run_dir.path), file=out, flush=True)
    with pinned_threads(config.run.threads):
        _seed_everything(config.run.seed)
        setup = build_setup(config)
        placement = None
        if device is not None and world.distributed:  # this rank's GPU (LOCAL_RANK)
            from .placement import Placement

            placement = Placement(device, config.run.precision, config.model.resident_bases)
        trainer = distributed.make_trainer(setup, config, world=world, run_dir=run_dir if main else None,
                                           hooks=hooks, placement=placement)
        if main and world.distributed:
            distributed.write_world_file(run_dir.path, world, trainer.assignment)
            for row in distributed.assignment_table(len(setup.lanes), world.world_size):
                print(f"rank {row['rank']}: bases {row['bases']} (replica {row['replica']})", file=sys.stderr)
        if state is not None:
            meta = restore_state(trainer, state)
            if main:
                run_dir.truncate_log(meta["iteration"])
                print(f"resuming {meta['stage']} at iteration {meta['iteration']} ({meta['phase']} phase, step "
                      f"{meta['step']})", file=sys.stderr, flush=True)
        total = sum(p.iterations for p in trainer.stage.phases)
        previous = _install_signals(trainer) if handle_signals else {}
        try:
            trainer.run(progress=Progress(total) if main else None)
        except Interrupted as stop:
            if main:
                print(f"{stop}; continue with: python -m training resume {os.fspath(run_dir.path)}",
                      file=sys.stderr, flush=True)
            distributed.shutdown(world)
            return EXIT_INTERRUPTED
        except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError, also on older releases
            print("out of device memory. Lower stage.clips or stage.micro_batch, or set "
                  "model.gradient_checkpointing=true, discriminator.gradient_checkpointing=true, "
                  "model.resident_bases=one, run.precision=bf16, discriminator.trainable=light; "
                  "`python -m training estimate CONFIG` shows what fits. The state after the last whole "
                  f"iteration is in {os.fspath(run_dir.state_dir)}.", file=sys.stderr, flush=True)
            distributed.abort(world, error)
            raise
        except Exception as error:
            distributed.abort(world, error)  # names the rank; torchrun then stops the others
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    distributed.shutdown(world)
    if main:
        print(f"done: {trainer.iteration} iterations; student in {os.fspath(run_dir.students_dir)}",
              file=sys.stderr, flush=True)
    return 0


def cmd_run(args, handle_signals: bool = True, hooks=()) -> int:
    from .run_dir import RunDir

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    config = config_module.load(args.config, overrides)
    setup_builder(config)  # fail before a run folder exists
    validation.require_writers(config)
    require_optimizer(config)
    world, device = distributed.init(config.run.device, timeout_s=config.distributed.timeout_s)
    restarted = distributed.agree(world, lambda: distributed.restarted_run(world, config, args.run_dir))
    if restarted is not None:  # torchrun --max-restarts: continue the run this job was writing
        if RunDir(restarted).latest_state() is not None:
            return cmd_resume(argparse.Namespace(run_dir=os.fspath(restarted), set=[]), handle_signals, hooks,
                              world=world, device=device)
        run_dir = RunDir(restarted)  # it died before its first checkpoint: start it again in place
    else:
        path = distributed.agree(world, lambda: RunDir.create(config, args.run_dir).path)
        run_dir = RunDir(path)
    return _train(config, run_dir, handle_signals=handle_signals, hooks=hooks, world=world, device=device)


def cmd_resume(args, handle_signals: bool = True, hooks=(), *, world=None, device=None) -> int:
    from .run_dir import RunDir, read_state

    run_dir = RunDir(args.run_dir)
    config = config_module.load(RunDir.open(args.run_dir).config_path if world is None or world.is_main
                                else run_dir.config_path, list(args.set or []))
    validation.require_writers(config)
    require_optimizer(config)
    if world is None:
        world, device = distributed.init(config.run.device, timeout_s=config.distributed.timeout_s)
    # rank 0 picks the state (every rank then reads the same file: a shared folder across machines)
    state = distributed.agree(world, run_dir.latest_state)
    if state is None:
        raise ConfigError(f"{os.fspath(run_dir.path)!r} has no saved state yet; start it again with "
                          f"`python -m training run {os.fspath(run_dir.config_path)} --run-dir <new folder>`")
    _, meta = read_state(state)
    saved = Config.from_dict(meta["config"], source=os.fspath(state))
    problems = config_module.resume_conflicts(saved, config, completed_iterations=meta["step"])
    if problems:
        raise ConfigError(f"cannot resume {os.fspath(run_dir.path)!r}:\n  " + "\n  ".join(problems))
    if world.is_main:
        run_dir.write_config(config)
    return _train(config, run_dir, state=state, handle_signals=handle_signals, hooks=hooks, world=world,
                  device=device)


def make_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a run from a TOML config")
    run.add_argument("config", help="TOML config (see training/examples/)")
    run.add_argument("--run-dir", help="run folder (default <run.runs_dir>/<run.name>-<timestamp>)")
    run.add_argument("--seed", type=int, help="overrides run.seed")
    run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                     help="override a config value (TOML syntax; repeatable), e.g. --set stage.iterations=50")
    run.set_defaults(handler=cmd_run)
    resume = sub.add_parser("resume", help="continue a run from its newest saved state")
    resume.add_argument("run_dir", help="the run folder")
    resume.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="change a value that does not alter the run (more iterations, intervals, device)")
    resume.set_defaults(handler=cmd_resume)
    missing = {}
    for name, module_name in (("estimate", "training.memory"), ("dataset", "training.dataset")):
        try:
            module = importlib.import_module(module_name)
            register = module.register_cli
        except (ImportError, AttributeError) as error:
            missing[name] = f"`python -m training {name}` needs {module_name}.register_cli, unavailable here ({error})"
            holder = sub.add_parser(name, help=f"(unavailable: {module_name} missing)")
            holder.add_argument("rest", nargs=argparse.REMAINDER)
            holder.set_defaults(handler=None, missing=name)
            continue
        register(sub)
    return parser, missing


def main(argv=None, *, handle_signals: bool = True, hooks=()) -> int:
    """The command line; ``hooks`` (``hook(event, record, trainer)``) are passed to the trainer of run/resume."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser, missing = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "missing", None):
        print(missing[args.missing], file=sys.stderr)
        return 2
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    try:
        if handler in (cmd_run, cmd_resume):
            return handler(args, handle_signals, hooks)
        # estimate / dataset: registered by training.memory / training.dataset
        result = handler(args)
        return int(result or 0)
    except LightningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
