"""Encode a split's gallery and queries with CFine and score retrieval both ways (docs/method.md §7)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets.transforms import to_model_input
from evaluation.metrics import evaluate_retrieval
from models.cfine import retrieval_features
from models.precision import autocast, compiled
from utils import distributed


@dataclass
class EncodedSplit:
    """Features (N, n, D) of every gallery image and every query caption of one split, in dataset order (CFine:
    its BN features, n = 3; zero-shot CLIP: its pooled embedding, n = 1)."""

    gallery: torch.Tensor
    queries: torch.Tensor
    gallery_pids: torch.Tensor
    query_pids: torch.Tensor


@torch.no_grad()
def encode_split(model, data, device: torch.device, amp: str = "off", batch_size: int = 256,
                 progress: bool = True, compile: str = "off") -> EncodedSplit:
    """Gallery images in the loader's batches, query captions in batches of batch_size; model in eval mode.

    Under torchrun each rank encodes a contiguous run of those same batches (no padded sampler), and the
    features are gathered in dataset order on every rank: the one-process result, bit for bit.
    compile: torch.compile backend of the two encoders ('off': eager); compiled code is cached between calls.
    """
    was_training = model.training
    model.eval()
    encode_images, encode_texts = compiled(model.encode_images, compile), compiled(model.encode_texts, compile)
    loader = _gallery_shard(data)
    empty = torch.zeros(0, *model.feature_shape, device=device)  # for a rank left without a batch
    gallery = [empty]
    for batch in tqdm(loader, desc=f"encode {data.split} gallery", disable=not progress, leave=False):
        with autocast(device, amp):
            images = to_model_input(batch["images"].to(device, non_blocking=True), data.mean_std)
            gallery.append(encode_images(images).float())
    queries = [empty]
    captions = distributed.shard_range(len(data.query_tokens), batch_size)
    tokens = data.query_tokens[captions.start:captions.stop]
    for start in tqdm(range(0, len(tokens), batch_size), desc=f"encode {data.split} queries",
                      disable=not progress, leave=False):
        with autocast(device, amp):
            queries.append(encode_texts(tokens[start:start + batch_size].to(device, non_blocking=True)).float())
    model.train(was_training)
    return EncodedSplit(distributed.gather_rows(torch.cat(gallery)), distributed.gather_rows(torch.cat(queries)),
                        data.gallery_pids.to(device), data.query_pids.to(device))


def _gallery_shard(data) -> DataLoader:
    """This rank's contiguous share of the gallery loader: the loader itself in one process.

    Built once per EvalData and kept on it, so that its persistent workers serve every evaluation of a run.
    """
    loader = data.gallery_loader
    images = distributed.shard_range(len(loader.dataset), loader.batch_size)
    if len(images) == len(loader.dataset):
        return loader
    if data.gallery_shard is None:
        data.gallery_shard = DataLoader(Subset(loader.dataset, images), batch_size=loader.batch_size,
                                        collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                                        pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers)
    return data.gallery_shard



def score_split(encoded: EncodedSplit) -> dict[str, dict[str, float]]:
    """Metrics per (retrieval feature, direction): keys 't2i', 'i2t', 't2i_global', 'i2t_global'."""
    results = {}
    for mode, suffix in (("concat", ""), ("global", "_global")):
        queries = retrieval_features(encoded.queries, mode)
        gallery = retrieval_features(encoded.gallery, mode)
        results[f"t2i{suffix}"] = evaluate_retrieval(queries, gallery, encoded.query_pids, encoded.gallery_pids)
        results[f"i2t{suffix}"] = evaluate_retrieval(gallery, queries, encoded.gallery_pids, encoded.query_pids)
    return results


def format_table(results: dict[str, dict[str, float]], single_feature: str | None = None) -> str:
    """A fixed-width table of R@1/5/10, mAP and mINP for each row of score_split's result.

    single_feature: the name of a model's one retrieval feature (zero-shot CLIP's pooled embedding, a --mgf off
    CFine's BN(global)), whose 't2i' and 'i2t' rows are shown alone under that name (its '_global' rows hold the
    same numbers).
    """
    feature = single_feature or "global+lg1+lg2"
    names = {"t2i": f"text->image [{feature}]", "t2i_global": "text->image [global only]",
             "i2t": f"image->text [{feature}]", "i2t_global": "image->text [global only]"}
    lines = [f"{'direction / feature':32s} {'R@1':>7s} {'R@5':>7s} {'R@10':>7s} {'mAP':>7s} {'mINP':>7s}"]
    for key in ("t2i", "i2t") if single_feature else ("t2i", "t2i_global", "i2t", "i2t_global"):
        if key in results:
            m = results[key]
            lines.append(f"{names[key]:32s} {m['R1']:7.2f} {m['R5']:7.2f} {m['R10']:7.2f} {m['mAP']:7.2f} {m['mINP']:7.2f}")
    return "\n".join(lines)
