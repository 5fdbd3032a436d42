"""Tiny generated image-text data in the real layouts: COCO 2014, a Flickr-style CSV, a class
folder, webdataset shards (with chosen bad samples). Images are solid colours named by their
captions, so a CLIP can actually learn them."""
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_image(name: str, i: int, size: int = 40, textured: bool = False) -> Image.Image:
    """A solid colour square (slightly taller for some i); textured: with seeded noise on it, so
    that a random crop of it changes the pixels (of a solid colour it cannot)."""
    r, g, b = COLOURS[name]
    shade = (i * 7) % 30  # distinct files, same colour
    image = Image.new("RGB", (size, size + i % 5), (max(0, r - shade), max(0, g - shade), max(0, b - shade)))
    if textured:
        noise = np.random.default_rng(i).integers(-40, 40, (image.height, image.width, 1))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def make_csv(root: Path, per_colour: int = 6, captions_per_image: int = 2, first: int = 0,
             textured: bool = False) -> Path:
    """root/images/*.jpg + root/captions.csv (image,caption; several rows per image); images
    number `first` on (another `first` gives other images: a held-out set)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for name in COLOURS:
        for i in range(first, first + per_colour):
            file = f"{name}_{i}.jpg"
            colour_image(name, i, textured=textured).save(root / "images" / file)
            rows += [f"{file},a {name} square number {k}" for k in range(captions_per_image)]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root / "captions.csv"


def make_coco(root: Path, train_per_colour: int = 6, val_per_colour: int = 3) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 0
    for split, n in (("train2014", train_per_colour), ("val2014", val_per_colour)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for c, name in enumerate(COLOURS):
            for i in range(n):
                image_id = 1000 * c + i
                file = f"COCO_{split}_{image_id:012d}.jpg"
                colour_image(name, i).save(root / split / file)
                images.append({"id": image_id, "file_name": file})
                for k in range(5):
                    ann_id += 1
                    annotations.append({"id": ann_id, "image_id": image_id, "caption": f"a {name} thing, take {k}"})
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def make_class_folder(root: Path, per_colour: int = 6) -> Path:
    for name in COLOURS:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_colour):
            colour_image(name, i).save(root / name / f"{i}.png")
    return root


def write_shard(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        writer = TarWriter(f, mtime=0.0)
        for s in samples:
            writer.write(s)
        writer.close()


def make_karpathy(coco_root: Path, path: Path) -> Path:
    """Karpathy's dataset_coco.json for the images make_coco wrote. As in the real file, every
    train2014 image is "train" and val2014 ones are "restval", "val" or "test" (here in turn);
    sentences[].raw are the COCO captions + " (karpathy)", so a test can tell where they came from."""
    images = []
    for folder, splits in (("train2014", ("train",)), ("val2014", ("restval", "val", "test"))):
        data = json.loads((coco_root / "annotations" / f"captions_{folder}.json").read_text())
        for i, im in enumerate(sorted(data["images"], key=lambda im: im["id"])):
            raws = [a["caption"] + " (karpathy)" for a in data["annotations"] if a["image_id"] == im["id"]]
            images.append({"filepath": folder, "filename": im["file_name"], "imgid": len(images), "cocoid": im["id"],
                           "split": splits[i % len(splits)], "sentids": [],
                           "sentences": [{"raw": r, "tokens": r.lower().split(), "imgid": len(images), "sentid": 0}
                                         for r in raws]})
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def grey16_png(path: Path, value: int, size: int = 12) -> Path:
    """A uniform 16-bit greyscale PNG (Pillow reads it back as mode I;16) of `value` in 0..65535."""
    import numpy as np
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(path)
    return path


def sideways_photo(path: Path, width: int = 80, height: int = 40) -> Image.Image:
    """A JPEG stored `width` x `height` with EXIF orientation 6, as a phone stores a portrait photo:
    every viewer turns it 90 degrees clockwise and shows `height` x `width`. Stored left half red,
    right half blue, so upright its top half is red. -> the image as a viewer shows it."""
    stored = Image.new("RGB", (width, height), COLOURS["blue"])
    stored.paste(COLOURS["red"], (0, 0, width // 2, height))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return stored.transpose(Image.Transpose.ROTATE_270)
