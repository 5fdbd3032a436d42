"""Class-captioned training from a folder of class subfolders (<path>/<class>/<image>):
captions come from templates, zero-shot runs on `eval_path` (same layout) or, when that is
null, on a held-out stratified split of `path` (the test split); per-epoch validation on
`val_fraction` of the training side (stratified, carved after the test split). Class names are the folder names, or
`classnames` (a file with one name per line, in sorted folder order)."""
import logging
from pathlib import Path

import numpy as np

from fastclip.data.captioned import (CaptionedImages, ZeroShotSet, caption_table, carve_validation,
                                     check_unseen_templates, split_indices)
from fastclip.data.pairs import ImageFiles
from fastclip.data.splits import ClipData, require_disjoint
from fastclip.data.textfile import read_names
from fastclip.errors import InputError, InputNotFound
from fastclip.schema.data import ImageFolder

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".gif"}
# What operating systems, archivers and tools leave beside the data. Hidden names (a leading dot:
# .ipynb_checkpoints, .DS_Store, macOS's AppleDouble ._IMG.jpg) are never data either.
OS_NAMES = {"__MACOSX", "__pycache__", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "lost+found",
            "Thumbs.db", "desktop.ini"}


def is_hidden_or_os(path: Path) -> bool:
    """Whether a folder or file is a hidden one or an OS's, never a class or an image."""
    return path.name.startswith(".") or path.name in OS_NAMES


def scan(root: str | Path, key: str = "dataset.path",
         subset: bool = False) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image files, their class index, class folder names sorted) of <root>/<class>/<image>.
    Hidden and OS folders and files (is_hidden_or_os) are left out, named in a warning; files of other
    suffixes are counted in a warning. Errors name `key` (the config key root came from): a class
    folder without an image is a ValueError naming it, a warning where `subset` (an evaluation folder,
    which may hold a subset of the classes)."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFound(f"{key}={str(root)!r}: no such directory")
    folders = [p for p in root.iterdir() if p.is_dir()]
    hidden = sorted(p.name for p in folders if is_hidden_or_os(p))
    classes = sorted(p.name for p in folders if not is_hidden_or_os(p))
    if not classes:
        raise InputError(f"{key}={str(root)!r}: no class subfolders" + (f" (only hidden or OS folders: {hidden})"
                                                                      if hidden else ""))
    files, labels, other, hidden_files, empty = [], [], 0, 0, []
    for i, cls in enumerate(classes):
        found = 0
        for f in sorted((root / cls).iterdir()):
            if is_hidden_or_os(f):
                hidden_files += f.is_file()
            elif f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(i)
                found += 1
            elif f.is_file():
                other += 1
        if not found:
            empty.append(cls)
    if hidden or hidden_files:
        log.warning("%s=%s: hidden and OS folders and files are not classes or images, left out: %s%s", key, root,
                    " ".join(hidden) or "no folder", f" and {hidden_files} files in the class folders" if hidden_files
                    else "")
    if other:
        log.warning("%s=%s: %d files without an image suffix (%s) left out", key, root, other,
                    " ".join(sorted(IMAGE_SUFFIXES)))
    suffixes = " ".join(sorted(IMAGE_SUFFIXES))
    if not files:
        raise InputError(f"{key}={str(root)!r}: no image file in its {len(classes)} class folders (suffixes "
                         f"{suffixes})")
    if empty and not subset:
        raise InputError(f"{key}={str(root)!r}: class folder(s) {empty} hold no image (suffixes {suffixes}): a class "
                         f"without images would be scored as a distractor; add its images or remove the folder")
    if empty:
        log.warning("%s=%s: class folder(s) %s hold no image: no %s image of those classes", key, root, empty, key)
    return files, np.array(labels), classes


def folder_classnames(cfg, classes: list[str] | None = None) -> list[str]:
    """Class names in sorted folder order: the `classnames` file when set, else the folder names."""
    classes = classes if classes is not None else scan(cfg.path)[2]
    if not cfg.classnames:
        return [c.replace("_", " ") for c in classes]
    path = Path(cfg.classnames)
    if not path.is_file():
        raise InputNotFound(f"dataset.classnames={str(path)!r}: no such file")
    names = read_names(path, f"dataset.classnames={str(path)!r}")
    if len(names) != len(classes):
        raise InputError(f"dataset.classnames={str(path)!r} has {len(names)} names; dataset.path has "
                         f"{len(classes)} class folders")
    return names


def training_labels(labels: np.ndarray, eval_classes: list[str], classes: list[str]) -> np.ndarray:
    """An eval folder's labels as indices of the TRAINING classes (matched by folder name): an eval
    set may hold a subset of the classes, in its own sorted order; a class training has not got
    fails, naming it."""
    unknown = sorted(set(eval_classes) - set(classes))
    if unknown:
        raise InputError(f"dataset.eval_path has class folders training (dataset.path) has not: {unknown}")
    index = np.array([classes.index(c) for c in eval_classes])
    return index[labels]


def build_image_folder(cfg: ImageFolder, preprocess_train, preprocess_eval, tokenizer) -> ClipData:
    """-> ClipData(train, zeroshot=test, val_zeroshot=validation); the splits' files checked disjoint."""
    check_unseen_templates(cfg.train_templates, cfg.eval_templates)
    files, labels, classes = scan(cfg.path)
    classnames = folder_classnames(cfg, classes)
    # files, not pixels: each image is decoded when it is read (the loader's workers), so building costs
    # a directory listing on every rank whatever the set's size; an undecodable one is skipped then
    if cfg.eval_path:
        eval_files, eval_labels, eval_classes = scan(cfg.eval_path, "dataset.eval_path", subset=True)
        train_labels, train_files = labels, files
        held_labels, held_files = training_labels(eval_labels, eval_classes, classes), eval_files
    else:
        train_idx, held_idx = split_indices(labels, cfg.holdout_fraction, cfg.split_seed)
        train_labels, train_files = labels[train_idx], [files[i] for i in train_idx]
        held_labels, held_files = labels[held_idx], [files[i] for i in held_idx]
    fit_idx, val_idx = carve_validation(np.arange(len(train_files)), train_labels, cfg.val_fraction, cfg.split_seed)
    val_labels, val_files = train_labels[val_idx], [train_files[i] for i in val_idx]
    train_labels, train_files = train_labels[fit_idx], [train_files[i] for i in fit_idx]
    # a separate eval_path may share files with path: eval.overlap drops them from training (or fails)
    # once the task is built, as for csv; only splits carved from one folder must be disjoint here
    carved = (("train", train_files), ("val", val_files)) + (() if cfg.eval_path else (("test", held_files),))
    require_disjoint(f"dataset=image_folder path={cfg.path}",
                     **{split: [str(Path(f).resolve()) for f in files] for split, files in carved})
    tokens = caption_table(classnames, cfg.train_templates, tokenizer)
    train = CaptionedImages(train_files, train_labels, tokens, preprocess_train, files=train_files)
    train.skipped = {}
    held = ImageFiles(held_files, preprocess_eval, held_labels)
    val = ImageFiles(val_files, preprocess_eval, val_labels)
    templates = list(cfg.eval_templates)
    return ClipData(train, zeroshot=ZeroShotSet(held, classnames, templates),
                    val_zeroshot=ZeroShotSet(val, classnames, templates))
