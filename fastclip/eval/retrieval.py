"""Image-text retrieval with several captions per image (COCO 5k, Flickr): recall@K both ways.

i2t: an image is a hit at K when ANY of its captions ranks in its top K captions.
t2i: a caption is a hit at K when ITS image ranks in its top K images.
"""
import torch
from fastclip.data.pairs import DecodedBatches
from fastclip.errors import InputError
from fastclip.eval import sharded

KS = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, caption_image: torch.Tensor, ks=KS) -> dict[str, float]:
    """similarity [n_images, n_captions]; caption_image[j] = index of caption j's image."""
    n_images, n_captions = similarity.shape
    out = {}
    # i2t: rank of the best-ranked own caption of each image
    own = caption_image[None, :] == torch.arange(n_images)[:, None]                    # [I, C]
    best_own = similarity.masked_fill(~own, float("-inf")).max(1).values               # [I]
    # ties count against the model: a constant similarity must not score R@1 = 1
    i2t_rank = ((similarity >= best_own[:, None]) & ~own).sum(1)                       # other captions as good
    # t2i: rank of the caption's own image
    own_score = similarity[caption_image, torch.arange(n_captions)]                     # [C]
    other = caption_image[None, :] != torch.arange(n_images)[:, None]
    t2i_rank = ((similarity >= own_score[None, :]) & other).sum(0)                     # other images as good
    for k in ks:
        out[f"retrieval/i2t_r{k}"] = float((i2t_rank < k).float().mean())
        out[f"retrieval/t2i_r{k}"] = float((t2i_rank < k).float().mean())
    return out


@torch.no_grad()
def retrieval_eval(model, tokenizer, retrieval, device, batch_size=256, num_workers=0,
                   timeout_s: float = 0) -> dict[str, float]:
    """retrieval: a RetrievalSet (ImageFiles yielding (tensor, image index), captions per image).
    Images that fail to decode are left out together with their captions, and counted. Inside
    sharded.together(), each rank encodes its share of the images and of the captions (whole batches
    of batch_size, as one process makes them) and every rank puts the features together in the set's
    order: the numbers are one process's."""
    was_training = model.training
    model.eval()
    features, kept = [], []
    batches = DecodedBatches(sharded.shard(retrieval.images, batch_size), batch_size, num_workers, timeout_s)
    for images, index in batches:
        features.append(model.encode_image(images.to(device), normalize=True).float().cpu())
        kept += index.tolist()
    pieces = sharded.gather((torch.cat(features) if features else None, kept, batches.skipped))
    kept = [i for _, k, _ in pieces for i in k]
    order = sorted(range(len(kept)), key=kept.__getitem__)  # the set's order, as one process encodes it
    kept = [kept[j] for j in order]
    captions = [retrieval.captions[i] for i in kept]
    flat = [c for caps in captions for c in caps]
    caption_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    text_features = [(b, model.encode_text(tokenizer(flat[r.start:r.stop]).to(device), normalize=True).float().cpu())
                     for b, r in sharded.batch_ranges(len(flat), batch_size)]
    text_features = sorted((b for piece in sharded.gather(text_features) for b in piece),
                           key=lambda batch: batch[0])
    model.train(was_training)
    if not kept:  # checked before training too (data.pairs.require_usable); files can vanish since
        raise InputError(f"{retrieval.description or 'the retrieval set'}: none of its {len(retrieval.images)} "
                         f"images could be decoded at evaluation")
    image_features = torch.cat([f for f, _, _ in pieces if f is not None])[order]
    similarity = image_features @ torch.cat([f for _, f in text_features]).T
    return {**recall_at_k(similarity, caption_image), "retrieval/images": float(len(kept)),
            "retrieval/skipped": float(sum(s for _, _, s in pieces)),  # images that did not decode
            "retrieval/skipped_rows": float(retrieval.skipped)}  # caption rows / samples left out when read
