"""Seeded synthetic video-text dataset: coloured shapes that move, appear, vanish or recolour.

Real H.264 mp4 files plus annotations in exactly the MSR-VTT layout, so the whole input path
(msrvtt reader -> decode -> TFDS builder -> tf.data) is exercised without downloading anything:

  OUT/videos/video<i>.mp4
  OUT/MSRVTT_data.json            {"videos": [{video_id, category, url, start time, end time,
                                    split, id}], "sentences": [{caption, video_id, sen_id}]}
  OUT/MSRVTT_train.9k.csv         video_id           (all training videos)
  OUT/MSRVTT_train.7k.csv         video_id           (the first 7/9 of them)
  OUT/MSRVTT_JSFUSION_test.csv    key,vid_key,video_id,sentence   (one sentence per test video)

A clip shows one or two shapes (circle / square / triangle in several colours) on a
background; each shape has one event: it moves left/right/up/down, appears, disappears or
changes colour. Captions describe all of it compositionally ("a red circle moves left while a
blue square appears on a green background") in several phrasings, some of which leave the
background out, so that telling clips apart needs scene-level cues (background, which shapes)
and frame-level ones (what changes over time, in which direction). Every test clip has a
distinct (background, shapes, colours, events) combination, so retrieval is well posed and a
small model trained from scratch can do better than chance.

  python -m data_pipeline.synthetic --out /tmp/synth [--num_train 300 --num_test 100]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import numpy as np

from data_pipeline.video import write_video

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
}
MOVES = ("left", "right", "up", "down")
EVENTS = MOVES + ("appears", "disappears", "changes")


def _sample_object(rng, background, avoid=()):
    shape = SHAPES[rng.integers(len(SHAPES))]
    # An object never has its background's colour (it would be invisible).
    colours = [c for c in COLOURS if c != background and c not in avoid]
    colour = colours[rng.integers(len(colours))]
    event = EVENTS[rng.integers(len(EVENTS))]
    new_colour = None
    if event == "changes":
        others = [c for c in COLOURS if c not in (background, colour)]
        new_colour = others[rng.integers(len(others))]
    return {"shape": shape, "colour": colour, "event": event, "new_colour": new_colour}


def sample_scene(rng) -> dict:
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    objects = [_sample_object(rng, background)]
    if rng.random() < 0.6:
        # A second object of a different colour so that "the red one" is unambiguous.
        objects.append(_sample_object(rng, background, avoid=(objects[0]["colour"],)))
    return {"background": background, "objects": objects}


def scene_key(scene: dict) -> tuple:
    objs = tuple(
        sorted(
            (o["shape"], o["colour"], o["event"], o["new_colour"] or "") for o in scene["objects"]
        )
    )
    return (scene["background"],) + objs


# ------------------------------------------------------------------------------- captions
def _verb(o, form):
    e = o["event"]
    if e in MOVES:
        return {"pres": f"moves {e}", "ing": f"moving {e}", "alt": f"slides {e}"}[form]
    if e == "changes":
        return {
            "pres": f"turns {o['new_colour']}",
            "ing": f"turning {o['new_colour']}",
            "alt": f"changes colour to {o['new_colour']}",
        }[form]
    if e == "appears":
        return {"pres": "appears", "ing": "appearing", "alt": "shows up"}[form]
    return {"pres": "disappears", "ing": "disappearing", "alt": "vanishes"}[form]


def _a(word):
    return "an" if word[0] in "aeiou" else "a"


def captions_for(scene: dict, num: int) -> list[str]:
    """`num` phrasings; the first is the canonical full description (used for the test csv)."""
    objs, bg = scene["objects"], scene["background"]
    np_ = [f"{_a(o['colour'])} {o['colour']} {o['shape']}" for o in objs]
    bare = [f"{o['colour']} {o['shape']}" for o in objs]
    if len(objs) == 1:
        forms = [
            f"{np_[0]} {_verb(objs[0], 'pres')} on a {bg} background",
            f"on a {bg} background {np_[0]} {_verb(objs[0], 'alt')}",
            f"{np_[0]} {_verb(objs[0], 'ing')}",
            f"{bare[0]} {_verb(objs[0], 'ing')} over {bg}",
            f"there is {np_[0]} that {_verb(objs[0], 'pres')} in front of a {bg} background",
            f"a video of {np_[0]} {_verb(objs[0], 'ing')}",
        ]
    else:
        forms = [
            f"{np_[0]} {_verb(objs[0], 'pres')} while {np_[1]} {_verb(objs[1], 'pres')} on a {bg} background",
            f"on a {bg} background {np_[1]} {_verb(objs[1], 'alt')} and {np_[0]} {_verb(objs[0], 'alt')}",
            f"{np_[0]} {_verb(objs[0], 'ing')} and {np_[1]} {_verb(objs[1], 'ing')}",
            f"{bare[1]} {_verb(objs[1], 'ing')}, {bare[0]} {_verb(objs[0], 'ing')}, {bg} background",
            f"two shapes on {bg}: {np_[0]} {_verb(objs[0], 'pres')} as {np_[1]} {_verb(objs[1], 'pres')}",
            f"a video where {np_[1]} {_verb(objs[1], 'pres')} while {np_[0]} {_verb(objs[0], 'pres')}",
        ]
    return [forms[i % len(forms)] for i in range(num)]


# -------------------------------------------------------------------------------- drawing
def _shape_mask(shape, cy, cx, r, yy, xx):
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    # Upward triangle: inside three half-planes.
    top, bottom = cy - r, cy + r * 0.8
    half_width = (yy - top) / (bottom - top) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def render(scene: dict, *, frame_size: int, num_frames: int, rng) -> np.ndarray:
    """uint8 [T, S, S, 3] frames of `scene`; positions get a little per-clip jitter."""
    s = frame_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    frames = np.empty((num_frames, s, s, 3), np.uint8)
    frames[:] = BACKGROUNDS[scene["background"]]
    r = s * 0.14
    n = len(scene["objects"])
    # Objects live in separate bands (top/bottom) so that they rarely hide each other.
    bands = [(0.3, 0.5)] if n == 1 else [(0.28, 0.3), (0.72, 0.7)]
    lo, hi = 0.22, 0.78  # start / end of a move, as fractions of the frame
    for o, (by, bx) in zip(scene["objects"], bands):
        jy, jx = rng.uniform(-0.05, 0.05, size=2)
        by, bx = by + jy, bx + jx
        switch = int(rng.integers(num_frames // 3, 2 * num_frames // 3 + 1))
        for t in range(num_frames):
            a = t / max(num_frames - 1, 1)
            cy, cx = by, bx
            e = o["event"]
            if e == "left":
                cx = hi + (lo - hi) * a
            elif e == "right":
                cx = lo + (hi - lo) * a
            elif e == "up":
                cy = hi + (lo - hi) * a
            elif e == "down":
                cy = lo + (hi - lo) * a
            if (e == "appears" and t < switch) or (e == "disappears" and t >= switch):
                continue
            colour = o["new_colour"] if (e == "changes" and t >= switch) else o["colour"]
            frames[t][_shape_mask(o["shape"], cy * s, cx * s, r, yy, xx)] = COLOURS[colour]
    return frames


# ---------------------------------------------------------------------------------- files
def _unique_scenes(rng, count, taken):
    scenes = []
    for _ in range(count * 1000):
        if len(scenes) == count:
            break
        sc = sample_scene(rng)
        k = scene_key(sc)
        if k not in taken:
            taken.add(k)
            scenes.append(sc)
    if len(scenes) < count:
        raise ValueError(f"could not draw {count} distinct scenes")
    return scenes


# x264 settings of the synthetic clips; chosen so that the same frames always give the same
# bytes. threads=1: frame/lookahead threads would make the output depend on timing. mbtree=0:
# with the macroblock tree (on by default under crf) x264 is not deterministic even
# single-threaded on these tiny clips -- re-encoding the same frames in one process gave
# several different bitstreams (e.g. seed 0, video149, 32 px / 2 fps: 2-8 variants in 100
# encodes), which decode to frames up to ~10-17 grey levels apart, so two builds of one seed
# differed. Without the tree, crf is plain per-frame adaptive quantisation, and reruns are
# byte-identical.
X264_OPTIONS = {"threads": "1", "x264-params": "mbtree=0"}
X264_CRF = 20


def write_clip(path: str, frames, fps: int) -> str:
    """Encodes one synthetic clip (uint8 RGB [T, S, S, 3]) deterministically: see `X264_OPTIONS`."""
    return write_video(path, frames, fps, crf=X264_CRF, options=dict(X264_OPTIONS))


def make_synthetic_dataset(
    out_dir: str,
    *,
    num_train: int = 300,
    num_test: int = 100,
    frame_size: int = 64,
    num_seconds: int = 4,
    fps: int = 6,
    seed: int = 0,
    captions_per_video: int = 5,
) -> str:
    """Writes the dataset under `out_dir` (see the module doc) and returns `out_dir`.

    The same arguments give the same files (scenes, jitter and encoder settings are seeded).
    """
    if frame_size % 2 or frame_size < 16:
        raise ValueError(f"frame_size must be even and >= 16 (H.264 4:2:0), got {frame_size}")
    if num_seconds < 1 or fps < 1:
        raise ValueError("num_seconds and fps must be >= 1")
    rng = np.random.default_rng(seed)
    taken: set = set()
    # Test scenes first and all distinct from each other; training scenes are distinct too, so
    # no clip is duplicated, but they may share attribute pairs with test scenes by design.
    test_scenes = _unique_scenes(rng, num_test, taken)
    train_scenes = _unique_scenes(rng, num_train, set())
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    videos, sentences, train_ids, test_rows = [], [], [], []
    sen_id = 0
    splits = [("train", s) for s in train_scenes] + [("test", s) for s in test_scenes]
    for i, (split, scene) in enumerate(splits):
        vid = f"video{i}"
        frames = render(
            scene,
            frame_size=frame_size,
            num_frames=num_seconds * fps,
            rng=np.random.default_rng([seed, i]),
        )
        write_clip(os.path.join(out_dir, "videos", vid + ".mp4"), frames, fps)
        videos.append(
            {
                "category": 0,
                "url": f"synthetic://{seed}/{vid}",
                "video_id": vid,
                "start time": 0.0,
                "end time": float(num_seconds),
                "split": split,
                "id": i,
            }
        )
        caps = captions_for(scene, captions_per_video)
        for c in caps:
            sentences.append({"caption": c, "video_id": vid, "sen_id": sen_id})
            sen_id += 1
        if split == "train":
            train_ids.append(vid)
        else:
            test_rows.append((f"ret{len(test_rows)}", f"msr{i}", vid, caps[0]))
    with open(os.path.join(out_dir, "MSRVTT_data.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "info": {"description": "ucofia-jax synthetic shapes", "seed": seed},
                "videos": videos,
                "sentences": sentences,
            },
            f,
        )
    for name, ids in (
        ("MSRVTT_train.9k.csv", train_ids),
        ("MSRVTT_train.7k.csv", train_ids[: len(train_ids) * 7 // 9]),
    ):
        with open(os.path.join(out_dir, name), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["video_id"])
            w.writerows([v] for v in ids)
    with open(
        os.path.join(out_dir, "MSRVTT_JSFUSION_test.csv"), "w", newline="", encoding="utf-8"
    ) as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        w.writerows(test_rows)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--num_train", type=int, default=300)
    p.add_argument("--num_test", type=int, default=100)
    p.add_argument("--frame_size", type=int, default=64)
    p.add_argument("--num_seconds", type=int, default=4)
    p.add_argument("--fps", type=int, default=6)
    p.add_argument("--captions_per_video", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.time()
    make_synthetic_dataset(
        a.out,
        num_train=a.num_train,
        num_test=a.num_test,
        frame_size=a.frame_size,
        num_seconds=a.num_seconds,
        fps=a.fps,
        seed=a.seed,
        captions_per_video=a.captions_per_video,
    )
    print(
        f"wrote {a.num_train} train + {a.num_test} test clips to {a.out} in {time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
