#!/usr/bin/env python3
"""Image processors, vlmq's Rust ones against transformers' (PIL backend),
on the same images with the released models' processor settings.

Not run by CI. Needs transformers (5.x) with Pillow and numpy, and a release
build of the `processor_speed` example:

    cargo build --release -p vlmq-candle --example processor_speed
    python crates/vlmq-candle/scripts/processor_speed.py \
        --rust-bin target/release/examples/processor_speed \
        --work /tmp/processor-speed --photo 1920x1080 \
        crates/vlmq-candle/tests/fixtures/hf-tiny-vlm/smolvlm/image_0.png \
        crates/vlmq-candle/tests/fixtures/hf-tiny-vlm/smolvlm/image_1.png

For each family (Qwen2-VL-2B's processor: min 3136 / max 12845056 pixels,
bicubic; SmolVLM-256M's: longest edge 2048, 512-pixel frames, LANCZOS) it
writes the processor config into WORK/FAMILY/, then times, per image,
the median of REPEATS calls of each processor on the decoded image
(decoding is not timed; transformers gets the PIL image, vlmq the decoded
RGB buffer), both on one thread. `--photo WxH` adds a generated photo-sized
image (smooth gradients, shapes, noise) saved as WORK/photo.png.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

# The released models' image processors (their processor_config.json's
# image_processor objects, as far as the processors read them).
CONFIGS = {
    "qwen2_vl": {
        "image_processor": {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "merge_size": 2,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 3136, "longest_edge": 12845056},
        },
    },
    "smolvlm": {
        "image_processor": {
            "image_processor_type": "SmolVLMImageProcessor",
            "do_convert_rgb": True,
            "do_image_splitting": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "max_image_size": {"longest_edge": 512},
            "resample": 1,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": 2048},
        },
        "image_seq_len": 64,
    },
}


def photo(path, width, height, seed=7):
    """A photo-sized RGB image: gradients, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            120 + 100 * np.sin(x / width * 3.1),
            90 + 80 * np.cos(y / height * 2.3),
            140 + 60 * np.sin((x + y) / (width + height) * 5.0),
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width - 50), rng.integers(0, height - 50)
        x1, y1 = x0 + rng.integers(20, width // 4), y0 + rng.integers(20, height // 4)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x0, y0, x1, y1], fill=color)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)


def time_python(proc, image, repeats):
    """Median milliseconds of one processor call, and the values it made."""
    out = proc(images=[image], return_tensors="np")
    values = out["pixel_values"]
    if "pixel_attention_mask" in out:  # SmolVLM pads frames: count real ones
        real = out["pixel_attention_mask"].reshape(values.shape[0] * values.shape[1], -1)
        values = values.reshape(real.shape[0], -1)[real.any(axis=1)]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        proc(images=[image], return_tensors="np")
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), int(np.prod(values.shape))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rust-bin", required=True, help="the processor_speed example binary")
    ap.add_argument("--work", required=True, help="folder for configs and the photo")
    ap.add_argument("--photo", help="WxH of a generated photo-sized image to add")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("images", nargs="*")
    a = ap.parse_args()

    from transformers import AutoImageProcessor

    os.makedirs(a.work, exist_ok=True)
    images = list(a.images)
    if a.photo:
        w, h = (int(v) for v in a.photo.lower().split("x"))
        p = os.path.join(a.work, "photo.png")
        photo(p, w, h)
        images.append(p)
    if not images:
        sys.exit("no images: pass image files and/or --photo WxH")
    env = dict(os.environ, RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    print("family\timage\tsize\tpython_ms\tvlmq_ms\tpython/vlmq\tvalues")
    for family, cfg in CONFIGS.items():
        d = os.path.join(a.work, family)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "processor_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        proc = AutoImageProcessor.from_pretrained(d, backend="pil")
        rust = subprocess.run(
            [a.rust_bin, family, d, str(a.repeats), *images],
            check=True, capture_output=True, text=True, env=env,
        ).stdout.splitlines()
        for path, line in zip(images, rust):
            _, rust_ms, rust_values = line.split("\t")
            with Image.open(path) as im:
                image = im.convert("RGB")
            py_ms, py_values = time_python(proc, image, a.repeats)
            if int(rust_values) != py_values:
                sys.exit(f"{family} {path}: {rust_values} values from vlmq, {py_values} from Python")
            rust_ms = float(rust_ms)
            print(
                f"{family}\t{os.path.basename(path)}\t{image.width}x{image.height}\t"
                f"{py_ms:.2f}\t{rust_ms:.2f}\t{py_ms / rust_ms:.1f}\t{py_values}"
            )


if __name__ == "__main__":
    main()
