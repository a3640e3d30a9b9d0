"""Latent training datasets: builders produce what their fakes imply, caches append and resume, shards verify.

The fakes make every value traceable: the image encoder averages 8x8 pixel blocks, so a latent holds the
frame's colours, which the test videos set from the frame index (red), the video (green) and a marker on the
border that the centre crop must cut away (blue); its fourth channel says which base's VAE encoded it. The text
encoder writes the base and the prompt's number into every value.
"""

import json

import cv2
import numpy as np
import pytest
import torch

from lightning.errors import InvalidInputError
from training import dataset as ds
from training.dataset_teacher import build_from_teacher, clip_seed
from training.dataset_video import build_from_videos

PROMPTS = ["", "a red fox running", "waves at night", "a cat walking", "rain on a window"]


def encode_text(base, prompts):
    ids = [PROMPTS.index(p) for p in prompts]
    return torch.stack([torch.full((2, 3), 100.0 * base + i) for i in ids])


class ImageEncoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, base, frames):
        self.calls += 1
        assert frames.dtype == torch.float32 and frames.ndim == 4 and frames.shape[-1] == 3
        pooled = torch.nn.functional.avg_pool2d(frames.permute(0, 3, 1, 2), 8)
        return torch.cat([pooled, torch.full_like(pooled[:, :1], float(base))], dim=1)


def frame_image(index, video, width, height, border="sides"):
    """BGR uint8: red = 20 * frame index, green = 40 * video, blue = 255 on the part the crop removes and 100 on
    the right half of what it keeps."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 2] = 20 * index
    image[..., 1] = 40 * video
    image[:, width // 2:, 0] = 100
    if border == "sides":
        cut = (width - height) // 2
        image[:, :cut, 0] = image[:, width - cut:, 0] = 255
    else:
        cut = (height - width) // 2
        image[:cut, :, 0] = image[height - cut:, :, 0] = 255
    return image


def frame_folder(folder, name, count, video, width=48, height=32, caption=None):
    (folder / name).mkdir(parents=True)
    for f in range(count):  # natural order matters: f_10 comes after f_9
        assert cv2.imwrite(str(folder / name / f"f_{f}.png"), frame_image(f, video, width, height))
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption + "\n")


def video_file(folder, name, count, video, width=32, height=48, caption=None):
    folder.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*"mp4v"), 8, (width, height))
    assert writer.isOpened()
    for f in range(count):
        writer.write(frame_image(f, video, width, height, border="top"))
    writer.release()
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption)


BASES = [("style_a", "hash-a"), ("style_b", "hash-b")]


def videos(tmp_path, out, folder, encoder, bases=BASES, **kw):
    kw = dict(frames=3, width=16, height=16, stride=2, clips_per_video=2, dtype="float32") | kw
    return build_from_videos(out, folder, bases=bases, encode_images=encoder, encode_text=encode_text, **kw)


def no_partial_files(path):
    return not [p for p in path.rglob("*") if "partial" in p.name]


def test_video_clips_hold_the_strided_cropped_resized_frames_of_their_video(tmp_path):
    folder = tmp_path / "clips"
    frame_folder(folder, "fox", 12, video=1, caption=PROMPTS[1])  # 48x32 frames: the sides are cropped
    video_file(folder, "waves.mp4", 10, video=2, caption=PROMPTS[2])  # 32x48: top and bottom are cropped
    (folder / "notes.json").write_text("{}")  # not a video: ignored
    encoder = ImageEncoder()
    steps = []
    report = videos(tmp_path, tmp_path / "data", folder, encoder, progress=lambda d, t: steps.append((d, t)))
    assert (report.added, report.skipped, report.clips) == (4, 0, 4)
    assert steps == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    data = ds.LatentDataset(tmp_path / "data")
    assert (data.frames, data.height, data.width, data.num_bases, len(data)) == (3, 2, 2, 2, 4)
    assert data.latent_shape == (3, 4, 2, 2) and data.text_shape == (2, 3)
    # 12 frames at stride 2: a clip spans 5; two clips spread over starts 0..7. 10 frames: starts 0 and 5.
    expected = {("fox", 0): [0, 2, 4], ("fox", 7): [7, 9, 11], ("waves.mp4", 0): [0, 2, 4],
                ("waves.mp4", 5): [5, 7, 9]}
    seen = {}
    for i, clip in enumerate(data.clips):
        source = clip["source"]
        assert clip["base"] is None  # video clips serve every base
        frames_of_clip = expected[(source["path"], source["start"])]
        for base in (0, 1):
            latents, cond = data.clip(i, base)
            video = 1 if source["path"] == "fox" else 2
            exact = source["path"] == "fox"  # PNG frames are lossless, mp4v is not
            tol = 1e-5 if exact else 0.06
            red = torch.tensor([20 * f / 255 for f in frames_of_clip]).view(3, 1, 1).expand(3, 2, 2)
            torch.testing.assert_close(latents[:, 0], red, atol=tol, rtol=0)
            torch.testing.assert_close(latents[:, 1], torch.full((3, 2, 2), 40 * video / 255), atol=tol, rtol=0)
            # the centred window, resized: its left half (no blue) and right half (blue 100), not the 255 border
            blue = torch.tensor([0.0, 100 / 255]).expand(3, 2, 2)
            torch.testing.assert_close(latents[:, 2], blue, atol=tol, rtol=0)
            assert (latents[:, 3] == 0).all()  # base 0's VAE encodes video clips for every base
            assert torch.equal(cond, torch.full((2, 3), 100.0 * base + PROMPTS.index(source["prompt"])))
        seen[(source["path"], source["start"])] = True
    assert seen.keys() == expected.keys()
    assert torch.equal(data.uncond(1), torch.full((2, 3), 100.0))
    assert no_partial_files(tmp_path)


def test_video_builder_appends_only_what_is_missing_and_adds_new_bases(tmp_path):
    folder, out = tmp_path / "clips", tmp_path / "data"
    frame_folder(folder, "fox", 6, video=1, caption=PROMPTS[1])
    encoder = ImageEncoder()
    videos(tmp_path, out, folder, encoder, bases=BASES[:1], clips_per_video=1)
    assert encoder.calls == 1
    again = videos(tmp_path, out, folder, encoder, bases=BASES[:1], clips_per_video=1)
    assert (again.added, again.skipped, encoder.calls) == (0, 1, 1)
    shards_before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    frame_folder(folder, "cat", 5, video=3, caption=PROMPTS[3])
    texts = []
    counting_text = lambda b, p: texts.append((b, tuple(p))) or encode_text(b, p)  # noqa: E731
    grown = build_from_videos(out, folder, bases=BASES, encode_images=encoder, encode_text=counting_text, frames=3,
                              width=16, height=16, stride=2, dtype="float32")
    assert (grown.added, grown.skipped, grown.conditioning_added, encoder.calls) == (1, 1, 1, 2)
    assert (1, ("",)) in texts and (1, (PROMPTS[1],)) in texts  # the new base got the old clip's caption
    assert all(b == 1 or p == (PROMPTS[3],) for b, p in texts)  # nothing old was encoded again for base 0
    for name, content in shards_before.items():  # old shards are never rewritten
        assert (out / "shards" / name).read_bytes() == content
    data = ds.LatentDataset(out)
    assert [len(data.lane_clips(b)) for b in (0, 1)] == [2, 2]
    fox = next(i for i, c in enumerate(data.clips) if c["source"]["path"] == "fox")
    assert torch.equal(data.clip(fox, 1)[1], torch.full((2, 3), 101.0))
    (folder / "cat.txt").write_text(PROMPTS[4])
    with pytest.raises(InvalidInputError, match=r"cat or its caption changed"):
        videos(tmp_path, out, folder, encoder, bases=BASES, clips_per_video=1)
    with pytest.raises(InvalidInputError, match=r"frames = 3.*asks for 4"):
        videos(tmp_path, out, folder, encoder, frames=4, stride=1, clips_per_video=1)
    with pytest.raises(InvalidInputError, match=r"style_a', 'style_b'\] \(in that order"):
        videos(tmp_path, out, folder, encoder, bases=BASES[::-1], clips_per_video=1)


def test_bad_video_folders_are_refused_naming_the_file_and_the_fix(tmp_path):
    encoder = ImageEncoder()
    out = tmp_path / "data"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"empty has no videos .* same-name \.txt caption"):
        videos(tmp_path, out, tmp_path / "empty", encoder)
    with pytest.raises(InvalidInputError, match=r"does not exist"):
        videos(tmp_path, out, tmp_path / "nowhere", encoder)
    folder = tmp_path / "bad"
    video_file(folder, "walk.mp4", 8, video=1)  # no caption
    frame_folder(folder, "short", 4, video=2, caption=PROMPTS[1])  # 4 frames; 3 at stride 2 need 5
    (folder / "broken.webm").write_bytes(b"not a video at all" * 10)
    (folder / "broken.txt").write_text(PROMPTS[2])
    frame_folder(folder, "silent", 6, video=3, caption="   ")
    with pytest.raises(InvalidInputError) as refused:
        videos(tmp_path, out, folder, encoder)
    message = str(refused.value)
    assert "4 problems" in message
    assert "walk.mp4 has no caption: write its prompt into walk.txt" in message
    assert "short has 4 frames; one clip of 3 frames at stride 2 needs 5" in message
    assert "broken.webm cannot be decoded by OpenCV" in message and "convert it to H.264 mp4" in message
    assert "the caption silent.txt of silent is empty" in message
    assert encoder.calls == 0 and not out.exists()  # refused before anything was encoded or written
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        videos(tmp_path, out, folder, encoder, width=20)
    with pytest.raises(InvalidInputError, match="stride must be an integer >= 1"):
        videos(tmp_path, out, folder, encoder, stride=0)


class Teacher:
    """A fake sampler whose clips say which call made them: every value is the call's number."""

    def __init__(self):
        self.calls = []

    def __call__(self, base, prompt, seed, frames, height, width):
        self.calls.append((base, prompt, seed))
        ramp = torch.arange(width // 8, dtype=torch.float32)  # left-to-right, so a flip shows
        return (len(self.calls) * 10 + ramp).expand(frames, 4, height // 8, width // 8).clone()


def teacher(out, sampler, **kw):
    kw = dict(bases=BASES, encode_text=encode_text, clips_per_base=3, frames=2, width=32, height=16, seed=7,
              shard_clips=2) | kw
    return build_from_teacher(out, PROMPTS[1:3], sample=sampler, **kw)


def test_teacher_clips_per_base_with_derived_seeds_skipping_cached_ones(tmp_path):
    out, sampler, steps = tmp_path / "data", Teacher(), []
    report = teacher(out, sampler, progress=lambda d, t: steps.append((d, t)))
    assert (report.added, report.skipped, report.clips) == (6, 0, 6)
    assert steps == [(0, 6)] + [(d, 6) for d in range(1, 7)]
    assert sampler.calls == [(b, PROMPTS[1 + k % 2], clip_seed(7, b, k)) for b in (0, 1) for k in range(3)]
    assert len({s for _, _, s in sampler.calls}) == 6 and clip_seed(7, 1, 2) == clip_seed(7, 1, 2)
    data = ds.LatentDataset(out)
    for b in (0, 1):
        clips = data.lane_clips(b)
        assert [c["base"] for c in clips] == [b] * 3  # a teacher clip belongs to the base that made it
        for clip in clips:
            i = data.clips.index(clip)
            call = sampler.calls.index((b, clip["source"]["prompt"], clip["source"]["seed"])) + 1
            latents, cond = data.clip(i, b)
            assert torch.equal(latents[..., 0], torch.full((2, 4, 2), 10.0 * call))
            assert torch.equal(cond, torch.full((2, 3), 100.0 * b + PROMPTS.index(clip["source"]["prompt"])))
    assert data.manifest["text_shape"] == [2, 3] and data.manifest["latent_shape"] == [2, 4, 2, 4]
    again = teacher(out, sampler)
    assert (again.added, again.skipped, len(sampler.calls)) == (0, 6, 6)
    more = teacher(out, sampler, clips_per_base=4, bases=BASES + [("style_c", "hash-c")])
    assert (more.added, more.skipped) == (6, 6)  # k = 3 for two bases, 0..3 for the new one
    assert sampler.calls[6:] == [(0, PROMPTS[2], clip_seed(7, 0, 3)), (1, PROMPTS[2], clip_seed(7, 1, 3))] + \
        [(2, PROMPTS[1 + k % 2], clip_seed(7, 2, k)) for k in range(4)]
    with pytest.raises(InvalidInputError, match=r"returned shape \[2, 4, 16, 32\]; expected \[2, 4, 2, 4\].*pixels"):
        teacher(tmp_path / "other", lambda b, p, s, f, h, w: torch.zeros(f, 4, h, w))
    with pytest.raises(InvalidInputError, match="at least one prompt"):
        build_from_teacher(tmp_path / "x", ["", "  "], bases=BASES, sample=sampler, encode_text=encode_text,
                           clips_per_base=1)
    nan = lambda b, p, s, f, h, w: torch.full((f, 4, h // 8, w // 8), float("nan"))  # noqa: E731
    with pytest.raises(InvalidInputError, match=r"NaN or Inf .* fp32 or bf16"):
        teacher(tmp_path / "nan", nan)


def test_cancel_mid_build_keeps_the_finished_clips_and_a_rerun_adds_only_the_rest(tmp_path):
    out, sampler = tmp_path / "data", Teacher()

    class Cancelled(Exception):
        pass

    def cancel_after_three():
        if len(sampler.calls) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        teacher(out, sampler, check_cancel=cancel_after_three)
    assert no_partial_files(tmp_path)
    data = ds.LatentDataset(out)  # 2 clips in a full shard, the third flushed on the way out
    assert len(data) == 3 and len(data.manifest["shards"]) == 2 and data.verify() == []
    resumed = teacher(out, sampler)
    assert (resumed.added, resumed.skipped, len(sampler.calls)) == (3, 3, 6)
    assert len({c[2] for c in sampler.calls}) == 6  # no clip was sampled twice
    assert len(ds.LatentDataset(out)) == 6


def test_a_corrupt_or_missing_shard_is_named_and_a_rebuild_replaces_it(tmp_path, capsys):
    out, sampler = tmp_path / "data", Teacher()
    teacher(out, sampler)
    shard = out / "shards" / "shard-000001.safetensors"
    content = bytearray(shard.read_bytes())
    content[-3] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(content))
    data = ds.LatentDataset(out)
    with pytest.raises(ds.DatasetError, match=r"shard-000001\.safetensors is corrupt.*Delete that file and run "
                                              r"the same build again"):
        for i in range(len(data)):
            data.clip(i, data.clips[i]["base"])
    assert ds.main(["verify", str(out)]) == 1
    assert "shard-000001.safetensors is corrupt" in capsys.readouterr().out
    shard.write_bytes(bytes(content[:100]))
    with pytest.raises(ds.DatasetError, match=r"shard-000001\.safetensors has 100 bytes.*truncated") as refused:
        ds.LatentDataset(out)
    assert refused.value.path == str(shard)
    shard.unlink()
    with pytest.raises(ds.DatasetError, match=r"shard-000001\.safetensors is missing"):
        ds.LatentDataset(out)
    repaired = teacher(out, sampler)
    assert (repaired.added, repaired.skipped) == (2, 4)  # the two clips that shard held
    data = ds.LatentDataset(out)
    assert len(data) == 6 and data.verify() == []
    assert not shard.exists() and (out / "shards" / "shard-000003.safetensors").exists()  # names never reused
    assert ds.main(["info", str(out)]) == 0
    assert "base 1: style_b (hash-b): 3 teacher clips, 0 video clips" in capsys.readouterr().out


def test_lane_data_follows_the_generator_alone_and_flips_as_drawn(tmp_path):
    out, sampler = tmp_path / "data", Teacher()
    teacher(out, sampler, clips_per_base=4)
    data = ds.LatentDataset(out, cache_shards=1)  # shards are re-read: what comes back must not depend on it
    lane = data.lane_data(1)
    assert not data._cache  # opening and making a lane read no shard: only drawing does
    g = torch.Generator().manual_seed(3)
    first = lane(3, g)
    state = g.get_state()
    second = lane(5, g)
    g2 = torch.Generator().manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, lane(3, g2)))
    g2.set_state(state)  # a resumed run restores only the generator and gets the same clips
    assert all(torch.equal(a, b) for a, b in zip(second, lane(5, g2)))
    latents, cond, uncond = second
    assert latents.shape == (5 * 2, 4, 2, 4) and latents.dtype == torch.float32
    assert cond.shape == uncond.shape == (5, 2, 3) and torch.equal(uncond, torch.full((5, 2, 3), 100.0))
    # reproduce the draw: clip picks, then flip bits, from the same generator
    g3 = torch.Generator().manual_seed(3)
    lane(3, g3)
    picks, flips = torch.randint(4, (5,), generator=g3), torch.randint(2, (5,), generator=g3)
    clips = data.lane_clips(1)
    for n, (pick, flipped) in enumerate(zip(picks.tolist(), flips.tolist())):
        stored, stored_cond = data.clip(data.clips.index(clips[pick]), 1)
        assert torch.equal(latents[2 * n:2 * n + 2], stored.flip(-1) if flipped else stored)
        assert torch.equal(cond[n], stored_cond)
    assert 0 < sum(flips.tolist()) < 5  # both kinds occur in this draw
    unflipped = data.lane_data(1, flip=False)(5, torch.Generator().manual_seed(3).set_state(state))
    for n, pick in enumerate(picks.tolist()):  # the same clips, never flipped
        assert torch.equal(unflipped[0][2 * n:2 * n + 2], data.clip(data.clips.index(clips[pick]), 1)[0])
    with pytest.raises(InvalidInputError, match=r"base index 2 is not in the dataset .* 2 bases"):
        data.lane_data(2)


def test_empty_lanes_and_unconditioned_bases_are_refused_clearly(tmp_path):
    out = tmp_path / "data"
    source = dict(kind="teacher", base=0, prompt=PROMPTS[1], seed=1)
    with ds.CacheWriter(out, frames=2, width=16, height=16, bases=BASES) as writer:
        writer.set_uncond(0, encode_text(0, [""]))
        writer.add_clip(source, 0, torch.zeros(2, 4, 2, 2), {0: encode_text(0, [PROMPTS[1]])})
    data = ds.LatentDataset(out)
    assert data.lane_data(0)(1, torch.Generator())[0].shape == (2, 4, 2, 2)
    with pytest.raises(InvalidInputError, match=r"no clips for base 1 \(style_b\); build teacher clips for it"):
        data.lane_data(1)
    with pytest.raises(InvalidInputError, match="no empty-prompt conditioning for base style_b"):
        data.uncond(1)
    assert data.base_index("hash-b") == 1
    with pytest.raises(InvalidInputError, match="not built for a base with hash hash-z"):
        data.base_index("hash-z")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == ds.FORMAT and manifest["version"] == ds.VERSION
    assert manifest["clips"][0]["source"] == source and manifest["bases"][1] == dict(name="style_b", hash="hash-b",
                                                                                      uncond=None)
    with pytest.raises(ds.DatasetError, match="has no manifest.json"):
        ds.LatentDataset(tmp_path)


KILLED_BUILD = r"""
import os, signal, sys, torch
import safetensors.torch
from training.dataset_teacher import build_from_teacher
save, written = safetensors.torch.save_file, []
def dying_save(tensors, filename, metadata=None):
    written.append(filename)
    if len(written) == 2:  # killed half-way through writing the second shard
        open(filename, "wb").write(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    save(tensors, filename, metadata=metadata)
safetensors.torch.save_file = dying_save
sample = lambda b, p, s, f, h, w: torch.full((f, 4, h // 8, w // 8), float(s % 1000))
text = lambda b, prompts: torch.ones(len(prompts), 2, 3)
build_from_teacher(sys.argv[1], ["a cat walking"], bases=[("a", "hash-a")], sample=sample, encode_text=text,
                   clips_per_base=5, frames=2, width=16, height=16, shard_clips=2)
"""


def test_a_killed_build_loses_only_its_unfinished_shard(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "data"
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(out)], cwd=root, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    assert [p.name for p in (out / "shards").glob(".*partial*")]  # the kill left its temporary behind
    assert len(ds.LatentDataset(out)) == 2  # the first shard and its manifest are whole
    sample = lambda b, p, s, f, h, w: torch.full((f, 4, h // 8, w // 8), float(s % 1000))  # noqa: E731
    text = lambda b, prompts: torch.ones(len(prompts), 2, 3)  # noqa: E731
    resumed = build_from_teacher(out, ["a cat walking"], bases=[("a", "hash-a")], sample=sample, encode_text=text,
                                 clips_per_base=5, frames=2, width=16, height=16, shard_clips=2)
    assert (resumed.added, resumed.skipped) == (3, 2)
    assert no_partial_files(tmp_path)  # the next build removed the dead builder's temporary
    data = ds.LatentDataset(out)
    assert len(data) == 5 and data.verify() == []


def test_cli_builds_through_the_comfy_backend_callables(tmp_path, monkeypatch, capsys):
    import sys
    import types

    import training

    opened = []
    fake = types.ModuleType("training.comfy_backend")
    fake.open_checkpoints = lambda paths: opened.append(list(paths)) or list(paths)
    fake.text_encoder = lambda checkpoints: encode_text
    fake.image_encoder = lambda checkpoints: ImageEncoder()
    fake.load_teacher = lambda path: "teacher module"
    fake.teacher_sampler = lambda checkpoints, module, teacher_path="": Teacher()
    monkeypatch.setitem(sys.modules, "training.comfy_backend", fake)
    monkeypatch.setattr(training, "comfy_backend", fake, raising=False)
    checkpoints = []
    for name in ("style_a", "style_b"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode() * 1000)
        checkpoints += ["--checkpoint", str(tmp_path / f"{name}.safetensors")]
    folder = tmp_path / "clips"
    frame_folder(folder, "fox", 5, video=1, caption=PROMPTS[1])
    out = str(tmp_path / "data")
    assert ds.main(["videos", str(folder), out, *checkpoints, "--frames", "3", "--width", "16", "--height", "16",
                    "--stride", "2"]) == 0
    (tmp_path / "prompts.txt").write_text(f"# teacher prompts\n{PROMPTS[3]}\n\n{PROMPTS[4]}\n")
    assert ds.main(["teacher", out, "--prompts", str(tmp_path / "prompts.txt"), "--motion-module", "mm.ckpt",
                    "--clips-per-base", "2", *checkpoints, "--frames", "3", "--width", "16", "--height", "16"]) == 0
    data = ds.LatentDataset(out)
    assert [b.name for b in data.bases] == ["style_a", "style_b"]
    assert data.bases[0].hash.startswith("sampled-sha256:") and data.bases[0].hash != data.bases[1].hash
    assert [len(data.lane_clips(b)) for b in (0, 1)] == [3, 3]
    assert {c["source"]["prompt"] for c in data.clips if c["base"] == 1} == {PROMPTS[3], PROMPTS[4]}
    assert "added 4 clips, 0 already cached; 5 clips" in capsys.readouterr().out
    (folder / "fox.txt").unlink()
    assert ds.main(["videos", str(folder), out, *checkpoints]) == 2
    assert "fox has no caption: write its prompt into fox.txt" in capsys.readouterr().err
    assert len(opened) == 2  # the refused folder never loaded models
