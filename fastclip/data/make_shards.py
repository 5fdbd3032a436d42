"""Convert COCO JSON / CSV / a class folder to webdataset shards, resizing offline (decoding a
full-size JPEG costs as much as a tiny CPU model step, so training should never do it).

    python -m fastclip.data.make_shards --source csv --path captions.csv --out shards/ [--image-size 64]
    python -m fastclip.data.make_shards --source coco --path /data/coco --split train2014 --out shards/
    python -m fastclip.data.make_shards --source folder --path /data/cifar10 --out shards/ [--template "a photo of a {}"]
    python -m fastclip.data.make_shards --source csv --path captions.csv --out shards/ --eval-fraction 0.1

Output: <out>/<prefix>-000000.tar ... in img2dataset's layout (key.jpg + key.txt + key.json) and
<out>/sizes.json (samples per shard). One sample per (image, caption) pair; the shorter image side
is resized to --image-size (aspect kept), re-encoded as JPEG. Deterministic: records in a fixed
order, keys numbered in that order, fixed tar mtime. Bad records (missing file, undecodable image,
empty caption; a CSV row that is not UTF-8 or has the wrong field count) are skipped and summarised
at the end by reason.

--eval-fraction F holds out that share of the source IMAGES (all captions of an image on one side,
drawn with --split-seed) into <out>/eval/ (its own sizes.json), for dataset.eval_shards (the test
split); --val-fraction V that share of the remaining images into <out>/val/, for dataset.val_shards
(per-epoch validation). The last line printed holds the overrides to paste, quoted for bash and Hydra.
"""
import argparse
import io
import json
import logging
import re
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from fastclip.data.coco import load_coco
from fastclip.data.csv_pairs import load_pairs
from fastclip.data.image_folder import scan
from fastclip.data.pairs import clean_caption, open_rgb, split_images
from fastclip.errors import InputError, one_line_errors

log = logging.getLogger("fastclip.make_shards")


def records_of(args) -> tuple[list[tuple[str, str, dict]], Counter]:
    """([(image path, caption, metadata)] in a deterministic order, rows skipped while reading by reason)."""
    if args.source == "csv":
        rows, skipped = load_pairs(args.path, args.image_root, args.image_column, args.caption_column, args.separator)
        return [(im, cap, {}) for im, cap in rows], skipped
    if args.source == "coco":
        groups, skipped = load_coco(Path(args.path), args.split)
        return [(im, cap, {}) for im in sorted(groups) for cap in (groups[im] or [""])], skipped
    if args.source == "folder":
        return folder_records(args.path, args.template), Counter()
    raise InputError(f"--source {args.source!r}: expected csv, coco or folder")


def folder_records(path, template: str) -> list[tuple[str, str, dict]]:
    """A class folder's records (--source folder): each image with `template` filled with its class
    name (underscores as spaces) as its caption, and its label and class as metadata; for convert()."""
    files, labels, classes = scan(path, "--path")
    return [(str(f), template.format(classes[c].replace("_", " ")), {"label": int(c), "class": classes[c]})
            for f, c in zip(files, labels)]


def split_records(records: list, eval_fraction: float, split_seed: int) -> tuple[list, list]:
    """(training, held-out) records, split BY SOURCE IMAGE: all captions of an image on one side."""
    images = list(dict.fromkeys(r[0] for r in records))
    held = split_images(images, eval_fraction, split_seed)[1]
    return [r for r in records if r[0] not in held], [r for r in records if r[0] in held]


def shard_pattern(out: Path, prefix: str, shards: int) -> str:
    """The brace pattern of the `shards` shards convert wrote to `out` (absolute)."""
    return str(out.resolve() / f"{prefix}-{{000000..{shards - 1:06d}}}.tar")


def pasteable_override(key: str, value: str) -> str:
    """`key='value'` that survives a paste into bash (outer double quotes, which bash strips) AND
    Hydra's parser (inner single quotes: a brace pattern is Hydra syntax unquoted)."""
    # Hydra: \' is a quote inside the quoted value; backslashes before a quote or the end double
    hydra = "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"
    return '"' + re.sub(r'([\\"$`])', r"\\\1", f"{key}={hydra}") + '"'


def resized_jpeg(image: Image.Image, size: int, quality: int) -> bytes:
    w, h = image.size
    if size and min(w, h) != size:
        scale = size / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode(path: str, size: int, quality: int) -> tuple[bytes | None, str | None]:
    """(resized JPEG bytes, None) or (None, why it was skipped)."""
    if not Path(path).is_file():
        log.warning("skipping %s: missing file", path)
        return None, "missing file"
    image = open_rgb(path, path)
    return (resized_jpeg(image, size, quality), None) if image is not None else (None, "undecodable image")


def convert(records, out: Path, prefix: str = "shard", shard_size: int = 1000, image_size: int = 64,
            quality: int = 90, progress: bool = True) -> dict:
    """Writes the shards and sizes.json; returns a summary {written, skipped: {reason: n}, shards}."""
    out.mkdir(parents=True, exist_ok=True)
    sizes, skipped = {}, Counter()
    last = (None, (None, None))  # (path, encoded): an image's captions are consecutive, decode it once
    writer, name, written = None, None, 0

    def close():
        if writer is not None:
            writer.close()
            stream.close()

    for i, (path, caption, meta) in enumerate(tqdm(records, desc="make_shards", disable=not progress)):
        text = clean_caption(caption, path)
        if text is None:
            skipped["empty caption"] += 1
            continue
        if path != last[0]:
            last = (path, encode(path, image_size, quality))
        jpeg, why = last[1]
        if jpeg is None:
            skipped[why] += 1
            continue
        if written % shard_size == 0:
            close()
            name = f"{prefix}-{written // shard_size:06d}.tar"
            stream = (out / name).open("wb")
            writer = TarWriter(stream, mtime=0.0)  # fixed mtime: the same input gives the same bytes
            sizes[name] = 0
        key = f"{written:09d}"
        writer.write({"__key__": key, "jpg": jpeg, "txt": text,
                      "json": json.dumps({"source": str(path), "index": i, **meta}, sort_keys=True)})
        sizes[name] += 1
        written += 1
    close()
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    return {"written": written, "skipped": dict(skipped), "shards": len(sizes)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, choices=["csv", "coco", "folder"])
    ap.add_argument("--path", required=True, help="CSV file, COCO root, or class folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefix", default="shard")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--image-size", type=int, default=64, help="shorter side in pixels; 0 keeps the size")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--split", default="train2014", help="coco: train2014 | val2014")
    ap.add_argument("--image-root", default=None, help="csv: image paths are relative to this")
    ap.add_argument("--image-column", default="image")
    ap.add_argument("--caption-column", default="caption")
    ap.add_argument("--separator", default=",")
    ap.add_argument("--template", default="a photo of a {}.", help="folder: caption template for the class name")
    ap.add_argument("--eval-fraction", type=float, default=0.0,
                    help="share of the source images held out into <out>/eval/ (0: none)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="share of the images left after --eval-fraction held out into <out>/val/ (0: none; "
                         "training then holds out its last shard for validation)")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the --eval-fraction and --val-fraction splits")
    args = ap.parse_args(argv)
    for flag, value in (("--eval-fraction", args.eval_fraction), ("--val-fraction", args.val_fraction)):
        if not 0.0 <= value < 1.0:
            ap.error(f"{flag} {value}: expected a value in [0, 1)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    records, read_skipped = records_of(args)
    train, held = split_records(records, args.eval_fraction, args.split_seed)
    train, val = split_records(train, args.val_fraction, args.split_seed)
    out = Path(args.out)
    shape = dict(prefix=args.prefix, shard_size=args.shard_size, image_size=args.image_size, quality=args.quality)
    summary = convert(train, out, **shape)
    summary["skipped"] = dict(Counter(summary["skipped"]) + read_skipped)  # rows the reader dropped count too
    written = {"dataset.train_shards": (out, summary)}
    if args.eval_fraction > 0:
        summary["eval"] = convert(held, out / "eval", **shape)
        written["dataset.eval_shards"] = (out / "eval", summary["eval"])
    if args.val_fraction > 0:
        summary["val"] = convert(val, out / "val", **shape)
        written["dataset.val_shards"] = (out / "val", summary["val"])
    for folder, part in written.values():
        report(part, folder)
    if summary["written"] == 0:
        raise InputError(f"--path {args.path}: no sample could be converted (skipped: {skipped_text(summary)})")
    summary["overrides"] = [pasteable_override(key, shard_pattern(folder, args.prefix, part["shards"]))
                            for key, (folder, part) in written.items() if part["shards"]]
    print("overrides: " + " ".join(summary["overrides"]))
    return summary


def skipped_text(summary: dict) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(summary["skipped"].items())) or "none"


def report(summary: dict, out: Path) -> None:
    print(f"wrote {summary['written']} samples in {summary['shards']} shards to {out}; skipped: {skipped_text(summary)}")


if __name__ == "__main__":
    with one_line_errors():
        main()
