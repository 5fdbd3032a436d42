"""The unigram text-boundary corpus is the training split's captions alone: a caption of a
validation or test image (csv) or of the shard held out for validation (webdataset) never enters it."""
import json

import torch

from conftest import compose_cfg
from datagen import COLOURS, colour_image, jpeg_bytes, make_csv, write_shard
from fastclip.data.csv_pairs import build_csv
from fastclip.data.shards import build_shards
from fastclip.tasks.clip import training_captions


def same(image):
    return image


def tokens(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def test_a_csv_corpus_holds_the_training_rows_only(tmp_path):
    csv = make_csv(tmp_path, per_colour=5, captions_per_image=1)  # 20 images
    rows = csv.read_text().splitlines()
    # each image's own caption, so a caption tells which split its image is in
    csv.write_text("\n".join([rows[0]] + [f"{r.split(',')[0]},the picture {r.split(',')[0]}" for r in rows[1:]]) + "\n")
    for pairs in ("all", "one_per_image"):
        cfg = compose_cfg(["dataset=csv", f"dataset.path={csv}", "dataset.eval_fraction=0.2",
                           "dataset.val_fraction=0.25", f"dataset.pairs={pairs}"]).dataset
        data = build_csv(cfg, same, same, tokens)
        held_out = {c for split in (data.retrieval, data.val_retrieval) for caps in split.captions for c in caps}
        assert len(held_out) == 8  # 4 test images, 4 validation ones
        corpus = training_captions(cfg)
        assert not held_out & set(corpus)
        assert sorted(corpus) == sorted(c for _, c in data.train.records) and len(corpus) == 12


def test_a_shard_corpus_leaves_out_the_shard_held_out_for_validation(tmp_path):
    for s in range(3):
        path = tmp_path / f"s-{s}.tar"
        write_shard(path, [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image(c, i, size=32)),
                            "txt": f"shard {s} sample {i}"} for i, c in enumerate(COLOURS)])
    (tmp_path / "sizes.json").write_text(json.dumps({f"s-{s}.tar": len(COLOURS) for s in range(3)}))
    overrides = ["dataset=webdataset", f"dataset.train_shards='{tmp_path}/s-{{0..2}}.tar'"]
    cfg = compose_cfg(overrides).dataset
    data = build_shards(cfg, same, same, tokens)
    held_out = {c for caps in data.val_retrieval.captions for c in caps}
    assert held_out == {f"shard 2 sample {i}" for i in range(len(COLOURS))}  # the last shard is validation's
    corpus = training_captions(cfg)
    assert not held_out & set(corpus)
    assert sorted(corpus) == sorted(f"shard {s} sample {i}" for s in (0, 1) for i in range(len(COLOURS)))
    # named validation shards: every training shard is read
    named = compose_cfg(overrides + [f"dataset.val_shards={tmp_path}/s-2.tar",
                                     f"dataset.train_shards='{tmp_path}/s-{{0..1}}.tar'"]).dataset
    assert sorted(training_captions(named)) == sorted(corpus)
