"""Training clips as latents on disk: the cache, its lanes, and the ``python -m training dataset`` commands.

A dataset is a folder::

    manifest.json                      what is in the cache (format below); replaced atomically after shards
    shards/shard-000000.safetensors    clip latents, text conditioning, the empty prompt's conditioning
    shards/shard-000001.safetensors    ... one new shard per flush; a written shard is never rewritten

Latents are ``[frames, 4, h, w]`` in the diffusion model's x0 space (the VAE's latent times 0.18215, the SD1.5
scale factor), so a lane hands them to the distillation math as they are. Each clip carries, per base model it
is distilled on, the text conditioning of its prompt; each base also has the empty prompt's conditioning once
(the unconditional branch of the CFG 7.5 teacher of the 128->32 MSE stage; AnimateDiff-Lightning, arXiv
2403.12706, §3.4). Teacher-generated clips belong to the one base that generated them (§3.1-3.2: data per base
model); clips from real videos belong to every base: SD1.5 VAEs share one latent space, so one encoding serves
all, while each base gets its own text conditioning, because style checkpoints fine-tune their text encoders.

Building is resumable and appendable: builders (``build_from_videos`` in :mod:`training.dataset_video`,
``build_from_teacher`` in :mod:`training.dataset_teacher`, both re-exported here) skip clips the manifest already
holds, buffer new ones and flush them as a new shard followed by the manifest. An exception (a Cancel raised by
the caller's hook, an out-of-memory) flushes the finished clips before it propagates; a killed process loses at
most the clips of the shard it was filling. A shard that vanished or was truncated is dropped from the manifest
by the next build, which then re-adds what it held.

Reading verifies: opening checks that every shard is there at its recorded size; a shard's sha256 is checked
when it is first read, so a corrupt file is named, never silently trained on. Shards are read lazily with a
small cache, so a dataset larger than memory can be trained on.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from ._core import core
PROBLEM_MISSING_FILE = core("errors").PROBLEM_MISSING_FILE
PROBLEM_UNREADABLE = core("errors").PROBLEM_UNREADABLE
InvalidInputError = core("errors").InvalidInputError
LightningError = core("errors").LightningError
ModelFileError = core("errors").ModelFileError
atomic_output = core("files").atomic_output

log = logging.getLogger(__name__)

FORMAT = "adlightning-latent-dataset"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_FOLDER = "shards"
LATENT_CHANNELS = 4
VAE_FACTOR = 8  # SD1.5 latents are 1/8 of the pixel size
LATENT_SPACE = "x0: VAE latent times 0.18215 (SD1.5 scale factor)"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SHARD_NAME = re.compile(r"^shard-(\d+)\.safetensors$")

__all__ = ["Base", "BuildReport", "CacheWriter", "DatasetError", "LatentDataset", "build_from_teacher",
           "build_from_videos", "fingerprint_file", "main", "register_cli"]


class DatasetError(ModelFileError):
    """A dataset folder, its manifest or one of its shards cannot be used; ``path`` names the file."""


@dataclasses.dataclass(frozen=True)
class Base:
    """A base model as the dataset knows it: a name for people and a hash that identifies the weights."""

    name: str
    hash: str


def as_bases(bases: Iterable) -> list[Base]:
    """``Base`` objects from ``Base``, ``(name, hash)`` or ``{"name": ..., "hash": ...}`` items."""
    result = []
    for item in bases:
        if isinstance(item, Base):
            result.append(item)
        elif isinstance(item, dict):
            result.append(Base(str(item["name"]), str(item["hash"])))
        else:
            name, digest = item
            result.append(Base(str(name), str(digest)))
    if not result:
        raise InvalidInputError("a dataset needs at least one base model (name, hash); none was given")
    hashes = [b.hash for b in result]
    if len(set(hashes)) != len(hashes):
        raise InvalidInputError(f"the same base model is given twice: {[b.name for b in result]} (hashes {hashes}); "
                                "give each checkpoint once")
    return result


def fingerprint_file(path: str | os.PathLike, samples: int = 64, chunk: int = 1 << 16) -> str:
    """A fast identity of a large weight file: sha256 of its size and ``samples`` chunks spread over it.

    Two fine-tunes of one model have the same size and header but different weights everywhere, so sampled
    chunks tell them apart while reading a few MiB instead of gigabytes.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as handle:
        for i in range(samples):
            handle.seek(max(0, (size - chunk) * i // max(1, samples - 1)))
            digest.update(handle.read(chunk))
    return "sampled-sha256:" + digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_key(source: dict) -> tuple:
    """What makes two clips the same clip: a build skips a clip whose key the cache already has."""
    if source["kind"] == "teacher":
        return ("teacher", int(source["base"]), source["prompt"], int(source["seed"]))
    if source["kind"] == "video":
        return ("video", source["path"], int(source["start"]), int(source["stride"]))
    raise InvalidInputError(f"unknown clip source kind {source.get('kind')!r}")


@dataclasses.dataclass
class BuildReport:
    """What a build did; ``clips`` counts the whole cache afterwards."""

    path: Path
    added: int
    skipped: int
    clips: int
    conditioning_added: int = 0


def check_sizes(frames: int, width: int, height: int) -> None:
    for name, value in (("frames", frames), ("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidInputError(f"dataset {name} must be a positive integer, got {value!r}")
    for name, value in (("width", width), ("height", height)):
        if value % VAE_FACTOR:
            raise InvalidInputError(f"dataset {name} {value} is not a multiple of {VAE_FACTOR} (SD1.5 latents are "
                                    f"1/{VAE_FACTOR} of the pixels); use {value // VAE_FACTOR * VAE_FACTOR or 8}")


# --- manifest -------------------------------------------------------------------------------------------

def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist; build it first (python -m training dataset "
                           "videos ..., or the ADL_TrainingDataset node)", path=folder, problem=PROBLEM_MISSING_FILE)
    if not path.is_file():
        raise DatasetError(f"{folder} has no {MANIFEST}, so it is not a dataset (or its first build never finished "
                           "a shard); build it again", path=path, problem=PROBLEM_MISSING_FILE)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path} is not readable JSON ({error}); it is written atomically, so something else "
                           "changed it: restore it or build the dataset again", path=path) from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a {FORMAT} manifest", path=path)
    if manifest.get("version") != VERSION:
        raise DatasetError(f"{path} has format version {manifest.get('version')}; this code reads version "
                           f"{VERSION}: update adlightning or rebuild the dataset", path=path)
    return manifest


def _shard_problem(folder: Path, shard: dict) -> str | None:
    """Why a manifest's shard cannot be used (cheap checks: presence and size), or None."""
    path = folder / shard["file"]
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"has {size} bytes, the manifest recorded {shard['bytes']} (truncated or replaced)"
    return None


def _fix_hint(folder: Path) -> str:
    return (f"delete that file and run the same build again: it drops the file's clips from the manifest and "
            f"re-adds them (check the rest with: python -m training dataset verify {folder})")


# --- writing --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _exclusive(folder: Path):
    """One builder per dataset at a time; the OS releases the lock when a killed builder dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; ComfyUI runs one prompt at a time anyway
        yield
        return
    lock_path = folder / ".lock"
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            raise InvalidInputError(f"another builder is writing the dataset {folder} right now; wait for it to "
                                    "finish (or stop it) and run this build again") from error
        # Holding the lock, no other builder is writing: temporaries left here were a killed builder's.
        for stale in [*folder.glob(".*.partial.*"), *folder.glob(f"{SHARD_FOLDER}/.*.partial.*")]:
            with contextlib.suppress(OSError):
                stale.unlink()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class CacheWriter:
    """Adds clips to a dataset folder, in new shards only; use as a context manager.

    Leaving the ``with`` block, normally or by an exception, flushes the buffered clips, so a cancelled build
    keeps what it finished. Creates the dataset when the folder has no manifest.
    """

    def __init__(self, path: str | os.PathLike, *, frames: int, width: int, height: int, bases: Sequence,
                 dtype: str = "float16", shard_clips: int = 32):
        check_sizes(frames, width, height)
        if dtype not in DTYPES:
            raise InvalidInputError(f"dataset dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not isinstance(shard_clips, int) or shard_clips < 1:
            raise InvalidInputError(f"shard_clips must be a positive integer, got {shard_clips!r}")
        self.path = Path(path)
        self.bases = as_bases(bases)
        self.shard_clips = shard_clips
        self.latent_shape = [frames, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR]
        self._requested = dict(frames=frames, pixel_width=width, pixel_height=height, dtype=dtype)
        self._stack = contextlib.ExitStack()

    # context management: lock, load or create the manifest, flush on the way out
    def __enter__(self) -> "CacheWriter":
        self._created = not self.path.exists()
        self._tensors = {}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._stack.enter_context(_exclusive(self.path))
            self._open()
        except BaseException:
            self._release()
            raise
        return self

    def _open(self) -> None:
        if (self.path / MANIFEST).exists():
            self.manifest = _read_manifest(self.path)
            self._check_compatible()
            self._drop_unusable_shards()
        else:
            self.manifest = dict(format=FORMAT, version=VERSION, latent_space=LATENT_SPACE, **self._requested,
                                 latent_shape=self.latent_shape, text_shape=None, num_bases=0, bases=[], shards=[],
                                 next_id=0, clips=[])
        for base in self.bases[len(self.manifest["bases"]):]:
            self.manifest["bases"].append(dict(name=base.name, hash=base.hash, uncond=None))
        self.manifest["num_bases"] = len(self.manifest["bases"])
        self._keys = {source_key(c["source"]): c for c in self.manifest["clips"]}
        self._tensors: dict[str, torch.Tensor] = {}
        self._new_clips: list[dict] = []
        self._new_conds: list[tuple[dict, int, str]] = []
        self._new_unconds: dict[int, str] = {}
        self._shared_conds: dict[tuple[int, int], tuple[torch.Tensor, str]] = {}
        self.dtype = DTYPES[self.manifest["dtype"]]

    def __exit__(self, kind, error, traceback):
        try:
            self.flush()
        finally:
            self._release()
        return False

    def _release(self) -> None:
        self._stack.close()
        if self._created and not (self.path / MANIFEST).exists():
            with contextlib.suppress(OSError):  # a build refused before writing anything leaves no folder
                (self.path / ".lock").unlink()
            with contextlib.suppress(OSError):
                (self.path / SHARD_FOLDER).rmdir()
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def _check_compatible(self) -> None:
        m = self.manifest
        for field, wanted in self._requested.items():
            if m[field] != wanted:
                raise InvalidInputError(
                    f"the dataset {self.path} holds clips with {field} = {m[field]!r}; this build asks for "
                    f"{wanted!r}. Build with {field} = {m[field]!r}, or give the dataset another name")
        held = [Base(b["name"], b["hash"]) for b in m["bases"]]
        if [b.hash for b in held] != [b.hash for b in self.bases[:len(held)]]:
            raise InvalidInputError(
                f"the dataset {self.path} was built for the base models {[b.name for b in held]} (in that order; "
                f"the order is the flow condition); this build has {[b.name for b in self.bases]}. Give the same "
                "bases in the same order (new ones may follow at the end), or give the dataset another name")

    def _drop_unusable_shards(self) -> None:
        m = self.manifest
        bad = {}
        for shard in m["shards"]:
            problem = _shard_problem(self.path, shard)
            if problem:
                bad[shard["file"]] = problem
        if not bad:
            return
        for name, problem in bad.items():
            log.warning("[AnimateDiff-Lightning] dataset shard %s %s; its clips are dropped and built again",
                        self.path / name, problem)
        m["shards"] = [s for s in m["shards"] if s["file"] not in bad]
        m["clips"] = [c for c in m["clips"] if c["shard"] not in bad]
        for clip in m["clips"]:
            clip["cond"] = {b: ref for b, ref in clip["cond"].items() if ref["shard"] not in bad}
        for base in m["bases"]:
            if base["uncond"] and base["uncond"]["shard"] in bad:
                base["uncond"] = None

    # what the cache holds
    def has(self, source: dict) -> bool:
        return source_key(source) in self._keys

    def needs_uncond(self, base: int) -> bool:
        return self.manifest["bases"][base]["uncond"] is None and base not in self._new_unconds

    def missing_conditioning(self) -> list[tuple[dict, int]]:
        """(clip, base) pairs of clips that belong to a base but lack its text conditioning (a base added later,
        or conditioning whose shard was dropped)."""
        pending = {(id(c), b) for c, b, _ in self._new_conds}
        missing = []
        for clip in self.manifest["clips"] + self._new_clips:
            bases = range(len(self.manifest["bases"])) if clip["base"] is None else [clip["base"]]
            missing += [(clip, b) for b in bases if str(b) not in clip["cond"] and (id(clip), b) not in pending]
        return missing

    # adding
    def _tensor(self, value: torch.Tensor, shape: Sequence[int] | None, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(f"{what} is a {type(value).__name__}, expected a torch tensor")
        if shape is not None and list(value.shape) != list(shape):
            raise InvalidInputError(f"{what} has shape {list(value.shape)}, the dataset needs {list(shape)}")
        stored = value.detach().to("cpu", self.dtype).contiguous()
        if not torch.isfinite(stored).all():
            raise InvalidInputError(
                f"{what} has NaN or Inf values (in {self.manifest['dtype']}); an fp16 VAE or text encoder can "
                "overflow: run it in fp32 or bf16")
        return stored

    def _text(self, value: torch.Tensor, what: str) -> torch.Tensor:
        if isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[0] == 1:
            value = value[0]
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidInputError(f"{what} has shape {shape}; text conditioning per prompt is [tokens, dim]")
        if self.manifest["text_shape"] is None:
            self.manifest["text_shape"] = list(value.shape)
        return self._tensor(value, self.manifest["text_shape"], what)

    def set_uncond(self, base: int, uncond: torch.Tensor) -> None:
        key = f"uncond.{base}"
        self._tensors[key] = self._text(uncond, f"the empty prompt's conditioning for base {base}")
        self._new_unconds[base] = key

    def add_clip(self, source: dict, base: int | None, latents: torch.Tensor,
                 conds: dict[int, torch.Tensor]) -> str:
        """Buffer one clip; ``base`` None: it belongs to every base. Flushes a shard when the buffer is full."""
        if self.has(source):
            raise InvalidInputError(f"the dataset already holds the clip {source}")
        clip_id = f"c{self.manifest['next_id']:07d}"
        self.manifest["next_id"] += 1
        key = f"{clip_id}.latents"
        self._tensors[key] = self._tensor(latents, self.latent_shape, f"the latents of {_describe(source)}")
        clip = dict(id=clip_id, base=base, source=source, shard=None, key=key, cond={})
        self._new_clips.append(clip)
        self._keys[source_key(source)] = clip
        for b, cond in conds.items():
            self.add_cond(clip, b, cond)
        if len(self._new_clips) >= self.shard_clips:
            self.flush()
        return clip_id

    def add_cond(self, clip: dict, base: int, cond: torch.Tensor) -> None:
        shared = self._shared_conds.get((id(cond), base))
        if shared is not None and shared[0] is cond:  # clips of one video share their caption's tensor in a shard
            key = shared[1]
        else:
            key = f"{clip['id']}.cond.{base}"
            what = f"the text conditioning of {_describe(clip['source'])} for base {base}"
            self._tensors[key] = self._text(cond, what)
            self._shared_conds[(id(cond), base)] = (cond, key)
        self._new_conds.append((clip, base, key))

    def flush(self) -> None:
        """Write the buffered tensors as a new shard, then the manifest (both atomically)."""
        if not self._tensors:
            return
        from safetensors.torch import save_file

        folder = self.path / SHARD_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in folder.iterdir() if (m := _SHARD_NAME.match(p.name))]
        taken += [int(_SHARD_NAME.match(Path(s["file"]).name).group(1)) for s in self.manifest["shards"]]
        name = f"{SHARD_FOLDER}/shard-{max(taken, default=-1) + 1:06d}.safetensors"
        with atomic_output(self.path / name) as temporary:
            save_file(self._tensors, str(temporary), metadata={"format": FORMAT, "version": str(VERSION)})
            digest, size = _sha256(temporary), temporary.stat().st_size
        m = self.manifest
        m["shards"].append(dict(file=name, sha256=digest, bytes=size, clips=len(self._new_clips)))
        for clip in self._new_clips:
            clip["shard"] = name
            m["clips"].append(clip)
        for clip, base, key in self._new_conds:
            clip["cond"][str(base)] = dict(shard=name, key=key)
        for base, key in self._new_unconds.items():
            m["bases"][base]["uncond"] = dict(shard=name, key=key)
        self._tensors, self._new_clips, self._new_conds, self._new_unconds = {}, [], [], {}
        self._shared_conds = {}
        with atomic_output(self.path / MANIFEST) as temporary:
            temporary.write_text(json.dumps(m, indent=1, ensure_ascii=False), encoding="utf-8")

    @property
    def clip_count(self) -> int:
        return len(self.manifest["clips"]) + len(self._new_clips)


def _describe(source: dict) -> str:
    if source.get("kind") == "teacher":
        return f"the teacher clip of base {source['base']} (prompt {source['prompt']!r}, seed {source['seed']})"
    if source.get("kind") == "video":
        return f"the clip of {source['path']} from frame {source['start']} (stride {source['stride']})"
    return repr(source)


def complete_conditioning(writer: CacheWriter, encode_text: Callable, check_cancel: Callable | None = None) -> int:
    """Encode what the cache lacks: every base's empty prompt and clip conditioning for bases added later."""
    for base in range(len(writer.manifest["bases"])):
        if writer.needs_uncond(base):
            writer.set_uncond(base, _encode_one(encode_text, base, ""))
    missing = writer.missing_conditioning()
    for clip, base in missing:
        if check_cancel is not None:
            check_cancel()
        writer.add_cond(clip, base, _encode_one(encode_text, base, clip["source"]["prompt"]))
    return len(missing)


def _encode_one(encode_text: Callable, base: int, prompt: str) -> torch.Tensor:
    result = encode_text(base, [prompt])
    if not isinstance(result, torch.Tensor) or result.ndim != 3 or result.shape[0] != 1:
        shape = list(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise InvalidInputError(f"encode_text(base {base}, 1 prompt) returned {shape}; expected [1, tokens, dim]")
    return result


# --- reading --------------------------------------------------------------------------------------------

class LatentDataset:
    """A verified, lazily read dataset; ``lane_data(base)`` is a lane's ``data(n, generator)`` source."""

    def __init__(self, path: str | os.PathLike, *, cache_shards: int = 8):
        self.path = Path(path)
        self.manifest = m = _read_manifest(self.path)
        try:
            self.frames = int(m["frames"])
            self.pixel_height, self.pixel_width = int(m["pixel_height"]), int(m["pixel_width"])
            self.latent_shape = tuple(int(v) for v in m["latent_shape"])
            self.height, self.width = self.latent_shape[2], self.latent_shape[3]
            self.text_shape = tuple(m["text_shape"]) if m["text_shape"] else None
            self.bases = [Base(b["name"], b["hash"]) for b in m["bases"]]
            self.num_bases = len(self.bases)
            self._shards = {s["file"]: s for s in m["shards"]}
            self.clips = m["clips"]
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise DatasetError(f"{self.path / MANIFEST} lacks or misstates {error}; build the dataset again",
                               path=self.path / MANIFEST) from error
        referenced = {c["shard"] for c in self.clips} | {r["shard"] for c in self.clips for r in c["cond"].values()}
        referenced |= {b["uncond"]["shard"] for b in m["bases"] if b["uncond"]}
        for name in sorted(referenced):
            if name not in self._shards:
                raise DatasetError(f"{self.path / MANIFEST} refers to {name}, which it does not list; build the "
                                   "dataset again", path=self.path / MANIFEST)
            problem = _shard_problem(self.path, self._shards[name])
            if problem:
                kind = PROBLEM_MISSING_FILE if problem == "is missing" else PROBLEM_UNREADABLE
                raise DatasetError(f"dataset shard {self.path / name} {problem}: {_fix_hint(self.path)}",
                                   path=self.path / name, problem=kind)
        self._cache: collections.OrderedDict[str, dict[str, torch.Tensor]] = collections.OrderedDict()
        self._cache_shards = max(1, int(cache_shards))
        self._lanes = [[i for i, c in enumerate(self.clips) if (c["base"] is None or c["base"] == b)
                        and str(b) in c["cond"]] for b in range(self.num_bases)]

    def __len__(self) -> int:
        return len(self.clips)

    def __repr__(self) -> str:
        return (f"LatentDataset({str(self.path)!r}: {len(self)} clips of {self.frames} frames at "
                f"{self.pixel_width}x{self.pixel_height}, {self.num_bases} bases)")

    @property
    def fingerprint(self) -> str:
        """Changes whenever what a lane can draw changes (a run resumed on another dataset state is not exact)."""
        content = [(c["id"], c["key"], sorted(c["cond"])) for c in self.clips]
        content.append(sorted((s["file"], s["sha256"]) for s in self._shards.values()))
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def base_index(self, hash: str) -> int:
        """The dataset's index of the base with this hash (the flow condition its clips were built for)."""
        for i, base in enumerate(self.bases):
            if base.hash == hash:
                return i
        raise InvalidInputError(f"the dataset {self.path} was not built for a base with hash {hash}; it has "
                                f"{[(b.name, b.hash) for b in self.bases]}. Build it with that base added at the end")

    def lane_clips(self, base_index: int) -> list[dict]:
        self._check_base(base_index)
        return [self.clips[i] for i in self._lanes[base_index]]

    def _check_base(self, base_index: int) -> None:
        if not isinstance(base_index, int) or not 0 <= base_index < self.num_bases:
            raise InvalidInputError(f"base index {base_index!r} is not in the dataset {self.path}, which has "
                                    f"{self.num_bases} bases {[b.name for b in self.bases]}")

    def _shard(self, name: str) -> dict[str, torch.Tensor]:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        from safetensors.torch import load

        path, expected = self.path / name, self._shards[name]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DatasetError(f"dataset shard {path} cannot be read ({error}): {_fix_hint(self.path)}",
                               path=path, problem=PROBLEM_MISSING_FILE) from error
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise DatasetError(f"dataset shard {path} is corrupt: its sha256 differs from the manifest's. "
                               f"{_fix_hint(self.path)[0].upper()}{_fix_hint(self.path)[1:]}", path=path)
        tensors = load(data)
        self._cache[name] = tensors
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return tensors

    def _get(self, shard: str, key: str) -> torch.Tensor:
        tensors = self._shard(shard)
        if key not in tensors:
            raise DatasetError(f"dataset shard {self.path / shard} has no tensor {key!r} although its hash matches "
                               "the manifest; build the dataset again", path=self.path / shard)
        return tensors[key]

    def clip(self, index: int, base_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [frames, 4, h, w], cond [tokens, dim]) of clip ``index`` for a base, float32."""
        clip = self.clips[index]
        ref = clip["cond"].get(str(base_index))
        if ref is None or (clip["base"] is not None and clip["base"] != base_index):
            raise InvalidInputError(f"clip {clip['id']} of {self.path} has no conditioning for base {base_index}")
        # copies: a caller changing them in place must not change the cached shard
        return (self._get(clip["shard"], clip["key"]).to(torch.float32, copy=True),
                self._get(ref["shard"], ref["key"]).to(torch.float32, copy=True))

    def uncond(self, base_index: int) -> torch.Tensor:
        self._check_base(base_index)
        ref = self.manifest["bases"][base_index]["uncond"]
        if ref is None:
            raise InvalidInputError(f"the dataset {self.path} has no empty-prompt conditioning for base "
                                    f"{self.bases[base_index].name}; run a build with that base to add it")
        return self._get(ref["shard"], ref["key"]).to(torch.float32, copy=True)

    def lane_data(self, base_index: int, flip: bool = True) -> Callable[[int, torch.Generator], tuple]:
        """``data(n, generator) -> (latents [n*frames, 4, h, w], cond [n, tokens, dim], uncond [n, tokens, dim])``.

        Clips are drawn with replacement and flipped left-right with probability 1/2 (the paper's random
        horizontal flips, §3.2), both from ``generator`` alone, so its state is the data position. The flip draws
        happen even with ``flip=False``, so switching flips off does not change which clips come.
        Drawing reads files, so it belongs outside a traced iteration; a memory plan can take the shapes from
        ``latent_shape`` and ``text_shape``, which opening the dataset reads from the manifest alone.
        """
        self._check_base(base_index)
        rows = self._lanes[base_index]
        if not rows:
            base = self.bases[base_index]
            videos_without = sum(1 for c in self.clips if c["base"] is None and str(base_index) not in c["cond"])
            hint = (f" {videos_without} video clips lack its text conditioning: run a build that includes it"
                    if videos_without else " build teacher clips for it or add videos")
            raise InvalidInputError(f"the dataset {self.path} has no clips for base {base_index} ({base.name});{hint}")
        if self.manifest["bases"][base_index]["uncond"] is None:
            self.uncond(base_index)  # raises the explanation; shards themselves are read only when drawing

        def data(n: int, generator: torch.Generator):
            if not isinstance(n, int) or n < 1:
                raise InvalidInputError(f"clips to draw must be a positive integer, got {n!r}")
            picks = torch.randint(len(rows), (n,), generator=generator, device=generator.device).tolist()
            flips = torch.randint(2, (n,), generator=generator, device=generator.device).tolist()
            latents, conds = [], []
            for pick, flipped in zip(picks, flips):
                clip_latents, cond = self.clip(rows[pick], base_index)
                latents.append(clip_latents.flip(-1) if flip and flipped else clip_latents)
                conds.append(cond)
            uncond = self.uncond(base_index)
            return torch.cat(latents), torch.stack(conds), uncond.expand(n, *uncond.shape).clone()

        return data

    def verify(self) -> list[str]:
        """Every shard's sha256 and every referenced tensor's shape; returns the problems (empty: all good)."""
        from safetensors import safe_open

        problems = []
        for name, shard in self._shards.items():
            path = self.path / name
            problem = _shard_problem(self.path, shard)
            if problem is None and _sha256(path) != shard["sha256"]:
                problem = "is corrupt (sha256 differs from the manifest's)"
            if problem:
                problems.append(f"{path} {problem}")
                continue
            with safe_open(str(path), "pt") as handle:
                shapes = {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}
            for clip in self.clips:
                if clip["shard"] == name and shapes.get(clip["key"]) != list(self.latent_shape):
                    problems.append(f"{path}: {clip['key']} has shape {shapes.get(clip['key'])}")
                for ref in clip["cond"].values():
                    if ref["shard"] == name and shapes.get(ref["key"]) != list(self.text_shape or []):
                        problems.append(f"{path}: {ref['key']} has shape {shapes.get(ref['key'])}")
        return problems

    def summary(self) -> str:
        m = self.manifest
        lines = [f"dataset {self.path}",
                 f"  {len(self)} clips of {self.frames} frames at {self.pixel_width}x{self.pixel_height} pixels, "
                 f"latents {list(self.latent_shape)} {m['dtype']} ({LATENT_SPACE})",
                 f"  text conditioning {self.text_shape}",
                 f"  {len(self._shards)} shards, {sum(s['bytes'] for s in self._shards.values()) / 2**20:.1f} MiB"]
        for b, base in enumerate(self.bases):
            teacher = sum(1 for i in self._lanes[b] if self.clips[i]["base"] == b)
            video = len(self._lanes[b]) - teacher
            lines.append(f"  base {b}: {base.name} ({base.hash}): {teacher} teacher clips, {video} video clips"
                         + ("" if m["bases"][b]["uncond"] else ", NO empty-prompt conditioning"))
        missing = sum(1 for c in self.clips for b in range(self.num_bases)
                      if (c["base"] is None or c["base"] == b) and str(b) not in c["cond"])
        if missing:
            lines.append(f"  {missing} clip/base pairs lack text conditioning: run a build with all bases")
        return "\n".join(lines)


def __getattr__(name: str):
    # The builders live in their own modules, which import this one; resolved lazily to avoid an import cycle.
    if name == "build_from_videos":
        from .dataset_video import build_from_videos
        return build_from_videos
    if name == "build_from_teacher":
        from .dataset_teacher import build_from_teacher
        return build_from_teacher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- command line ---------------------------------------------------------------------------------------

def _comfy_callables(args, *, teacher: bool) -> dict[str, Callable]:
    """The builders' callables backed by ComfyUI's VAE, CLIP and sampler (``training.comfy_backend``)."""
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = args.comfyui
    try:
        from . import comfy_backend
    except ImportError as error:
        raise LightningError(f"building from checkpoints needs ComfyUI through training.comfy_backend, which did not "
                             f"import ({error}); give --comfyui PATH or COMFYUI_PATH, or build with the "
                             "ADL_TrainingDataset node inside ComfyUI") from error
    needed = ["open_checkpoints", "text_encoder"] + (["load_teacher", "teacher_sampler"] if teacher else
                                                     ["image_encoder"])
    absent = [name for name in needed if not hasattr(comfy_backend, name)]
    if absent:
        raise LightningError(f"training.comfy_backend lacks {absent}; build with the ADL_TrainingDataset node")
    checkpoints = comfy_backend.open_checkpoints(args.checkpoint)
    callables = dict(encode_text=comfy_backend.text_encoder(checkpoints))
    if teacher:
        module = comfy_backend.load_teacher(args.motion_module)
        callables["sample"] = comfy_backend.teacher_sampler(checkpoints, module, teacher_path=args.motion_module)
    else:
        callables["encode_images"] = comfy_backend.image_encoder(checkpoints)
    return callables


def _bases_from_checkpoints(paths: Sequence[str]) -> list[Base]:
    bases = []
    for path in paths:
        if not Path(path).is_file():
            raise InvalidInputError(f"base checkpoint {path} does not exist")
        bases.append(Base(Path(path).stem, fingerprint_file(path)))
    return bases


def _progress_printer(label: str):
    def progress(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total} clips", end="\n" if done >= total else "", file=sys.stderr, flush=True)
    return progress


def _cmd_info(args) -> int:
    print(LatentDataset(args.path).summary())
    return 0


def _cmd_verify(args) -> int:
    dataset = LatentDataset(args.path)
    problems = dataset.verify()
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s): {_fix_hint(dataset.path)}")
        return 1
    print(f"ok: {len(dataset)} clips in {len(dataset._shards)} shards, every sha256 matches")
    return 0


def _cmd_videos(args) -> int:
    from .dataset_video import build_from_videos, scan_folder

    scan_folder(args.folder, frames=args.frames, stride=args.stride)  # refuse a bad folder before loading models
    bases = _bases_from_checkpoints(args.checkpoint)
    report = build_from_videos(args.out, args.folder, bases=bases, **_comfy_callables(args, teacher=False),
                               frames=args.frames, width=args.width, height=args.height,
                               stride=args.stride, clips_per_video=args.clips_per_video, dtype=args.dtype,
                               shard_clips=args.shard_clips, progress=_progress_printer("videos"))
    print(f"added {report.added} clips, {report.skipped} already cached; {report.clips} clips in {report.path}")
    return 0


def _cmd_teacher(args) -> int:
    from .dataset_teacher import build_from_teacher, read_prompts

    prompts = read_prompts(Path(args.prompts).read_text(encoding="utf-8"))
    bases = _bases_from_checkpoints(args.checkpoint)
    report = build_from_teacher(args.out, prompts, bases=bases, **_comfy_callables(args, teacher=True),
                                clips_per_base=args.clips_per_base, frames=args.frames, width=args.width,
                                height=args.height, seed=args.seed, dtype=args.dtype, shard_clips=args.shard_clips,
                                progress=_progress_printer("teacher"))
    print(f"added {report.added} clips, {report.skipped} already cached; {report.clips} clips in {report.path}")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``dataset {info,verify,videos,teacher}`` to a ``python -m training`` subparsers object.

    Each command sets ``func(args) -> exit code`` as its default.
    """
    parser = subparsers.add_parser("dataset", help="build, inspect and verify latent training datasets",
                                   description="Latent training datasets (training.dataset).")
    commands = parser.add_subparsers(dest="dataset_command", required=True)

    info = commands.add_parser("info", help="print sizes, bases and clip counts of a dataset")
    info.add_argument("path")
    info.set_defaults(func=_cmd_info)
    verify = commands.add_parser("verify", help="check every shard's sha256 and tensor shapes (exit 1 on problems)")
    verify.add_argument("path")
    verify.set_defaults(func=_cmd_verify)

    def common(sub):
        sub.add_argument("--checkpoint", action="append", required=True,
                         help="an SD1.5 checkpoint file; repeat for several bases, in base-index order")
        sub.add_argument("--frames", type=int, default=16)
        sub.add_argument("--width", type=int, default=256, help="pixels, a multiple of 8")
        sub.add_argument("--height", type=int, default=256, help="pixels, a multiple of 8")
        sub.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage dtype")
        sub.add_argument("--comfyui", help="ComfyUI folder (else COMFYUI_PATH or the ComfyUI this pack is in)")

    videos = commands.add_parser("videos", help="encode a folder of captioned videos (needs ComfyUI for VAE/CLIP)")
    videos.add_argument("folder", help="videos (mp4/webm/mov) or frame folders, each with a same-name .txt caption")
    videos.add_argument("out", help="dataset folder (created, or appended to)")
    common(videos)
    videos.add_argument("--stride", type=int, default=1, help="take every Nth frame")
    videos.add_argument("--clips-per-video", type=int, default=1, help="0: every non-overlapping clip")
    videos.add_argument("--shard-clips", type=int, default=32)
    videos.set_defaults(func=_cmd_videos)

    teacher = commands.add_parser("teacher", help="clips sampled by the AnimateDiff teacher (needs ComfyUI)")
    teacher.add_argument("out", help="dataset folder (created, or appended to)")
    teacher.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    teacher.add_argument("--motion-module", required=True, help="the teacher motion module file")
    teacher.add_argument("--clips-per-base", type=int, required=True)
    teacher.add_argument("--seed", type=int, default=0)
    common(teacher)
    teacher.add_argument("--shard-clips", type=int, default=8)
    teacher.set_defaults(func=_cmd_teacher)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.dataset ...``: the same commands as ``python -m training dataset ...``."""
    parser = argparse.ArgumentParser(prog="python -m training")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dataset", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except LightningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
