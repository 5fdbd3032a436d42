"""What a model's training images looked like, per data source, so that inference can say what a
model expects and when an input is far from it (fastclip.infer). Only what the source guarantees is
stated: scikit-learn's digits are 8x8 grayscale with bright ink on a dark ground; the folder, CSV,
COCO and webdataset sources hold whatever photos the user brought, so only their size is compared."""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InputProfile:
    """source: the data set in words; native_side: the training images' side in pixels where the
    source fixes it (None: any); ground: "dark" where every training image has a dark background
    (bright strokes), None where the source says nothing."""
    source: str
    native_side: int | None = None
    ground: str | None = None


PROFILES = {
    "digits": InputProfile("scikit-learn's 8x8 handwritten digits: grayscale, bright ink on a dark background",
                           native_side=8, ground="dark"),
    "image_folder": InputProfile("images from class folders (dataset.path)"),
    "csv": InputProfile("image-caption pairs from a CSV (dataset.path)"),
    "coco2014": InputProfile("COCO 2014 photos with captions"),
    "webdataset": InputProfile("webdataset shards of image-text pairs"),
}


def profile_of(dataset: str) -> InputProfile:
    return PROFILES.get(dataset, InputProfile(f"dataset={dataset}"))


UPSCALE_FAR = 4  # an input side upscaled more than this many times is mostly invented detail
NATIVE_FAR = 8  # an input side more than this many times the training images' native side is far finer


def far_from_training(image, profile: InputProfile, model_side: int) -> list[str]:
    """What sets a PIL image apart from the training images, each as a short note that says what
    would be near ([] when nothing the profile states does): a dark-ground model given a light-ground
    image (the border's mean brightness above one half, on 0..1); an image far smaller than the
    model's input (upscaled more than UPSCALE_FAR times: its detail is invented by the resize); an
    image far larger than the source's native side (more than NATIVE_FAR times: the model learned
    from much coarser images). A moderately larger image (a 64 px drawing for 8 px digits) is only
    resized, and gets no note."""
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    notes = []
    if profile.ground == "dark":
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        if border.mean() > 0.5:
            notes.append(f"a light background (border brightness {border.mean():.2f} of 1): this model saw only "
                         f"bright ink on dark; invert the image (PIL.ImageOps.invert) or expect a guess")
    side, size = min(image.size), f"{image.size[0]}x{image.size[1]} px"
    if side * UPSCALE_FAR < model_side:
        notes.append(f"{size} is upscaled more than {UPSCALE_FAR}x to the model's {model_side} px input; near: "
                     f"at least {-(-model_side // UPSCALE_FAR)} px a side")
    if profile.native_side and side > NATIVE_FAR * profile.native_side:
        notes.append(f"{size}: the training images were {profile.native_side}x{profile.native_side} (read at "
                     f"{model_side} px), so its detail is far finer than what the model learned; near: the subject "
                     f"filling a square image of at most {NATIVE_FAR * profile.native_side} px a side")
    return notes
