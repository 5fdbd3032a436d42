"""dataset=image_folder decodes lazily: building it lists files and opens no image (so it costs no
memory per image on any rank), each image is decoded when the loader reads it, an undecodable file
is skipped then and counted, and the eval-overlap check still finds a copy by content."""
import shutil

import PIL.Image

from conftest import build, compose_cfg, tokens
from datagen import make_class_folder
from fastclip.data.image_folder import build_image_folder
from fastclip.data.overlap import EvalOverlap
from fastclip.data.pairs import Skip, collate_skipping
from fastclip.eval.zeroshot import zero_shot_eval


def test_building_opens_no_image_and_reading_decodes_each(tmp_path, monkeypatch):
    root = make_class_folder(tmp_path / "folder", per_colour=4)
    (root / "red" / "broken.png").write_bytes(b"not a png")
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    data = build(build_image_folder, ["dataset=image_folder", f"dataset.path={root}"])
    assert opened == [] and data.train.skipped == {}
    samples = [data.train[i] for i in range(len(data.train))]
    held = [data.zeroshot.images[i] for i in range(len(data.zeroshot.images))]
    assert len(opened) == len(data.train) + len(data.zeroshot.images)  # each image once, as it is read
    decoded = [s for s in samples + held if s is not None and not isinstance(s, Skip)]
    assert all(isinstance(s[0], PIL.Image.Image) and s[0].mode == "RGB" for s in decoded)
    broken = [str(f) for f in data.train.files + data.zeroshot.images.files + data.val_zeroshot.images.files
              if f.name == "broken.png"]
    assert len(broken) == 1  # in one split, undecoded: read there, it is skipped and counted
    if broken[0] in map(str, data.train.files):
        assert collate_skipping(samples).skipped == {"undecodable image": 1}
    else:
        assert sum(s is None for s in held) + sum(
            data.val_zeroshot.images[i] is None for i in range(len(data.val_zeroshot.images))) == 1


def test_zero_shot_leaves_an_undecodable_eval_image_out(tmp_path):
    import torch
    root = make_class_folder(tmp_path / "train", per_colour=3)
    held = tmp_path / "held"
    shutil.copytree(root, held)
    (held / "red" / "broken.png").write_bytes(b"not a png")
    cfg = compose_cfg(["dataset=image_folder", f"dataset.path={root}", f"dataset.eval_path={held}"])
    to_tensor = lambda im: torch.zeros(3, 2, 2)  # noqa: E731
    data = build_image_folder(cfg.dataset, to_tensor, to_tensor, tokens)

    class Model(torch.nn.Module):  # every image the same embedding: top-5 over 4 classes is every image
        def encode_image(self, x, normalize=True):
            return torch.ones(len(x), 4)

        def encode_text(self, t, normalize=True):
            return torch.ones(len(t), 4)
    acc = zero_shot_eval(Model(), tokens, data.zeroshot.images, data.zeroshot.classnames, ["a {}."], "cpu", 5)
    assert acc["top5"] == 1.0  # over the 12 decodable images; the broken one neither counted nor fatal


def test_overlap_still_found_by_content_without_decoding(tmp_path):
    root = make_class_folder(tmp_path / "train", per_colour=3)
    held = make_class_folder(tmp_path / "held", per_colour=1)
    shutil.copy(held / "red" / "0.png", root / "red" / "copy.png")  # same bytes, another name
    data = build(build_image_folder, ["dataset=image_folder", f"dataset.path={root}", f"dataset.eval_path={held}"])
    overlap = EvalOverlap("drop")
    for f in data.zeroshot.images.files:
        overlap.add(f)
    held_bytes = {f.read_bytes() for f in data.zeroshot.images.files}
    copies = {str(f) for f in data.train.files if f.read_bytes() in held_bytes}
    assert copies and data.train.exclude_eval(overlap) == len(copies)
    assert not copies & set(map(str, data.train.files)) and len(data.train.files) == len(data.train)
