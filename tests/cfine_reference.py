"""A plain, loop-based reference of CFine docs/method.md §2-5, written from docs/method.md alone (no import from models/).

It loops over samples and tokens the way the authors' release does (per-sample Python loops, B x B x n x D
repeats for the similarities, triplets mined on the CPU) and is the yardstick for the vectorised code: tests
compare values and gradients against it, benchmarks/head_speed.py compares time and memory. It reads the head's parameters
(MGF block, BN, classifier) but none of its code. Training mode only (BN uses batch statistics).
"""
from __future__ import annotations

import math

import torch

from clip.model import TokenFeatures

# ---------------------------------------------------------------- synthetic inputs


def random_image_tokens(batch: int, num_tokens: int, width: int, generator=None) -> TokenFeatures:
    """Random image tokens (B, N, D) with a random class-token attention row (sums to 1)."""
    tokens = torch.randn(batch, num_tokens, width, generator=generator)
    attention = torch.randn(batch, num_tokens, generator=generator).mul(2).softmax(dim=1)
    return TokenFeatures(tokens, attention, torch.zeros(batch, dtype=torch.long))


def random_text_tokens(batch: int, length: int, width: int, eot: torch.Tensor, generator=None) -> TokenFeatures:
    """Random text tokens (B, L, D) with EOT at eot[b]; the EOT attention row is 0 after EOT (causal mask)."""
    tokens = torch.randn(batch, length, width, generator=generator)
    scores = torch.randn(batch, length, generator=generator).mul(2)
    future = torch.arange(length).unsqueeze(0) > eot.unsqueeze(1)
    attention = scores.masked_fill(future, float("-inf")).softmax(dim=1)
    return TokenFeatures(tokens, attention, eot.clone())


# ---------------------------------------------------------------- small helpers, one vector at a time


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| along the last axis."""
    return v / v.norm(dim=-1, keepdim=True)


def layer_norm(x: torch.Tensor, ln) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias per row."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def attention(x: torch.Tensor, memory: torch.Tensor, mha, ignored: set[int]) -> torch.Tensor:
    """Multi-head attention of the rows of x over the rows of memory, with keys in `ignored` left out."""
    width = x.shape[-1]
    heads = mha.num_heads
    head_dim = width // heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q, k, v = x @ wq.T + bq, memory @ wk.T + bk, memory @ wv.T + bv
    left_out = torch.tensor([n in ignored for n in range(len(memory))])
    outputs = []
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        scores = (q[:, part] @ k[:, part].T / math.sqrt(head_dim)).masked_fill(left_out, float("-inf"))
        outputs.append(scores.softmax(dim=-1) @ v[:, part])
    return torch.cat(outputs, dim=-1) @ mha.out_proj.weight.T + mha.out_proj.bias


def block(x: torch.Tensor, memory: torch.Tensor, mgf, ignored: set[int]) -> torch.Tensor:
    """docs/method.md §2 residual cross-attention block for one sample: x (1+k, D), memory (N, D)."""
    x = x + attention(layer_norm(x, mgf.ln_0), layer_norm(x, mgf.ln_0), mgf.self_attn, set())
    x = x + attention(layer_norm(x, mgf.ln_1), memory, mgf.cross_attn, ignored)
    hidden = layer_norm(x, mgf.ln_2) @ mgf.mlp.c_fc.weight.T + mgf.mlp.c_fc.bias
    hidden = hidden * torch.sigmoid(1.702 * hidden)
    return x + hidden @ mgf.mlp.c_proj.weight.T + mgf.mlp.c_proj.bias


def batch_norm(rows: list[torch.Tensor], bn) -> torch.Tensor:
    """Training-mode BatchNorm1d over a list of B vectors: batch mean, biased variance."""
    x = torch.stack(rows)
    mean = sum(rows) / len(rows)
    var = sum((r - mean) ** 2 for r in rows) / len(rows)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


# ---------------------------------------------------------------- docs/method.md §2: selection and MGF


def select(tokens: torch.Tensor, scores: torch.Tensor, k: int, candidates: list[int]):
    """One sample: candidates ranked by score (ties: lower position first); groups of ranks 1..k, k+1..2k."""
    values = scores.tolist()
    ranked = sorted(candidates, key=lambda n: (-values[n], n))[: 2 * k]
    chosen = torch.stack([tokens[n] for n in ranked])
    return chosen[:k], chosen[k:], chosen, ranked


def modality(feats: TokenFeatures, ratio: float, is_text: bool, mgf, bn):
    """docs/method.md §2 for one modality, sample by sample: global token, selections, BN features (B, 3, D)."""
    batch, length, _ = feats.tokens.shape
    k = int(length * ratio)
    globals_, group1, selected, rows = [], [], [], [[], [], []]
    for b in range(batch):
        g = int(feats.global_index[b])
        scores = feats.global_attention[b]
        if is_text and feats.padding_mask is not None and g == 0:
            # docs/method.md §9 (BERT): every position is a candidate, [CLS]'s score multiplied by 0 (so it ties with
            # the [PAD]s, and ranks first among them by position); the cross-attention ignores the [PAD] keys.
            candidates = list(range(length))
            scores = scores * torch.tensor([0.0] + [1.0] * (length - 1))
            ignored = {n for n in range(length) if bool(feats.padding_mask[b, n])}
        elif is_text:
            candidates = [n for n in range(length) if n != 0 and n != g]
            ignored = set(range(g + 1, length))
        else:
            candidates = [n for n in range(length) if n != 0]
            ignored = set()
        tokens = feats.tokens[b]
        first, second, chosen, _ = select(tokens, scores, k, candidates)
        global_token = tokens[g]
        rows[0].append(global_token)
        for slot, group in ((1, first), (2, second)):
            x = torch.cat([global_token.unsqueeze(0), group])
            rows[slot].append(block(x, tokens, mgf, ignored)[0])
        globals_.append(global_token)
        group1.append(first)
        selected.append(chosen)
    features = torch.stack([batch_norm(r, bn) for r in rows], dim=1)
    return features, globals_, group1, selected


# ---------------------------------------------------------------- docs/method.md §3 and §4: similarities


def soft_max_pool(scores: torch.Tensor) -> torch.Tensor:
    """sum_n softmax(s)_n s_n over the last axis."""
    return (scores.softmax(dim=-1) * scores).sum(dim=-1)


def cross_grained(img_global, img_selected, txt_global, txt_selected, tau: float = 0.07) -> torch.Tensor:
    """docs/method.md §3 sim_cs through explicit B x B x n x D repeats, as the authors' release builds them."""
    batch = len(img_global)
    img_glob, img_sel = unit(torch.stack(list(img_global))), unit(torch.stack(list(img_selected)))
    txt_glob, txt_sel = unit(torch.stack(list(txt_global))), unit(torch.stack(list(txt_selected)))
    n_txt, n_img = txt_sel.shape[1], img_sel.shape[1]
    # s[i, j, w] = <G_img_i, S_txt_j,w> / tau
    s_iw = (img_glob[:, None, None, :].repeat(1, batch, n_txt, 1) * txt_sel[None].repeat(batch, 1, 1, 1)).sum(-1)
    # s[i, j, p] = <S_img_i,p, G_txt_j> / tau
    s_pt = (img_sel[:, None].repeat(1, batch, 1, 1) * txt_glob[None, :, None, :].repeat(batch, 1, n_img, 1)).sum(-1)
    return (soft_max_pool(s_iw / tau) + soft_max_pool(s_pt / tau)) / 2


def fine_grained(img_patches, txt_words, k_word: int = 3, k_patch: int = 3, tau: float = 0.01) -> torch.Tensor:
    """docs/method.md §4 sim_cd: per-sample affinity, token-by-token top-k means, then B x B x n x D repeats."""
    batch = len(img_patches)
    pos_word, pos_patch = [], []
    for i in range(batch):
        patches, words = img_patches[i], txt_words[i]
        affinity = (unit(patches) @ unit(words).T).softmax(dim=1)  # A_i, softmax over words
        pos_word.append(torch.stack([
            unit(words[affinity[p].topk(min(k_word, len(words))).indices].mean(dim=0)) for p in range(len(patches))
        ]))
        pos_patch.append(torch.stack([
            unit(patches[affinity[:, w].topk(min(k_patch, len(patches))).indices].mean(dim=0))
            for w in range(len(words))
        ]))
    pos_word, pos_patch = torch.stack(pos_word), torch.stack(pos_patch)  # (B, P, D), (B, W, D)
    patches_all, words_all = unit(torch.stack(list(img_patches))), unit(torch.stack(list(txt_words)))
    # sim_pw0[i, j] = mean_p <P_i,p, posWord_j,p>;  sim_pw1[i, j] = mean_w <posPatch_i,w, W_j,w>
    pw0 = (patches_all[:, None].repeat(1, batch, 1, 1) * pos_word[None].repeat(batch, 1, 1, 1)).sum(-1).mean(-1)
    pw1 = (pos_patch[:, None].repeat(1, batch, 1, 1) * words_all[None].repeat(batch, 1, 1, 1)).sum(-1).mean(-1)
    return (pw0 / tau + pw1 / tau) / 2


# ---------------------------------------------------------------- docs/method.md §5: objectives


def cmpm(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """docs/method.md §5 CMPM, anchor by anchor."""
    batch = len(pids)
    total = 0.0
    for x, y in ((img, txt), (txt, img)):
        y_unit = unit(y)
        per_anchor = []
        for i in range(batch):
            same = torch.tensor([float(pids[i] == pids[j]) for j in range(batch)])
            q = same / math.sqrt(float(same.sum()))
            p = torch.softmax(y_unit @ x[i], dim=0)
            per_anchor.append((p * (torch.log(p) - torch.log(q + 1e-8))).sum())
        total = total + sum(per_anchor) / batch
    return total


def cmpc(img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """docs/method.md §5 CMPC, sample by sample."""
    batch = len(pids)
    classifier = weight / weight.norm(dim=0, keepdim=True)
    total = 0.0
    for x, y in ((img, txt), (txt, img)):
        per_sample = []
        for i in range(batch):
            t = unit(y[i])
            logits = (x[i] @ t) * t @ classifier
            per_sample.append(-torch.log_softmax(logits, dim=0)[int(pids[i])])
        total = total + sum(per_sample) / batch
    return total


def diversity(parts: torch.Tensor) -> torch.Tensor:
    """docs/method.md §5 diversity, sample by sample: ||G_b with zero diagonal||_F / n^2, averaged."""
    n = parts.shape[1]
    values = []
    for b in range(parts.shape[0]):
        x = unit(parts[b])
        gram = x @ x.T
        off = torch.stack([torch.stack([gram[r, c] if r != c else gram[r, c] * 0 for c in range(n)]) for r in range(n)])
        values.append(torch.sqrt((off**2).sum()) / n**2)
    return sum(values) / len(values)


def ranking(similarity: torch.Tensor, pids: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """docs/method.md §5 ranking loss: triplets mined with NumPy-style loops on CPU values, loss summed in torch."""
    labels = pids.tolist()
    total = similarity.sum() * 0
    for matrix in (similarity, similarity.T):
        values = matrix.detach().cpu().tolist()
        triplets = []
        anchor, negatives = None, []
        for anchor in range(len(labels)):
            negatives = [j for j in range(len(labels)) if labels[j] != labels[anchor]]
            if not negatives:
                continue
            hardest = max(negatives, key=lambda j: (values[anchor][j], -j))  # first maximum
            if values[anchor][hardest] > values[anchor][anchor]:
                triplets.append((anchor, hardest))
        if not triplets and negatives:  # authors' fallback: the last anchor and its first negative
            triplets.append((anchor, negatives[0]))
        for a, n in triplets:
            total = total + torch.relu(margin - matrix[a, a] + matrix[a, n])
    return total


# ---------------------------------------------------------------- the whole training head


def head_losses(head, image: TokenFeatures, text: TokenFeatures, pids: torch.Tensor) -> dict[str, torch.Tensor]:
    """docs/method.md §2-5 end to end for a CFineHead's parameters: features, the weighted loss parts and their total."""
    config = head.config
    img_f, img_g, img_g1, img_sel = modality(image, config.image_ratio, False, head.mgf, head.image_bn)
    txt_f, txt_g, txt_g1, txt_sel = modality(text, config.text_ratio, True, head.mgf, head.text_bn)
    weight = head.classifier.weight
    sim = cross_grained(img_g, img_sel, txt_g, txt_sel, config.tau_cs)
    sim = sim + fine_grained(img_g1, txt_g1, config.k_word, config.k_patch, config.tau_cd)
    parts = {
        "cmpm": sum(w * cmpm(img_f[:, n], txt_f[:, n], pids) for n, w in enumerate(config.cmpm_weights)),
        "cmpc": sum(w * cmpc(img_f[:, n], txt_f[:, n], pids, weight) for n, w in enumerate(config.cmpc_weights)),
        "diversity": config.diversity_weight * (diversity(img_f[:, 1:]) + diversity(txt_f[:, 1:])),
        "ranking": config.ranking_weight * ranking(sim, pids, config.margin),
    }
    return {
        "image_features": img_f,
        "text_features": txt_f,
        "similarity": sim,
        "loss": sum(parts.values()),
        **parts,
    }


def random_bert_tokens(batch: int, length: int, width: int, real: torch.Tensor, generator=None) -> TokenFeatures:
    """docs/method.md §9 text: random tokens (B, L, D); [CLS] at 0; real[b] real ids then [PAD]s, whose scores are ~0 (the
    additive mask), so the [CLS] attention row puts no weight on them."""
    tokens = torch.randn(batch, length, width, generator=generator)
    padding = torch.arange(length).unsqueeze(0) >= real.unsqueeze(1)
    scores = torch.randn(batch, length, generator=generator).mul(2).masked_fill(padding, -1e4)
    return TokenFeatures(tokens, scores.softmax(dim=1), torch.zeros(batch, dtype=torch.long), padding)


def near_duplicate_pairs(feats: TokenFeatures, noise: float, generator=None) -> TokenFeatures:
    """Sample 2m+1 := sample 2m plus a little noise: different ids with near-equal similarities make triplets count."""
    tokens = feats.tokens.clone()
    tokens[1::2] = tokens[0::2][: tokens[1::2].shape[0]] + noise * torch.randn(tokens[1::2].shape, generator=generator)
    attention = feats.global_attention.clone()
    attention[1::2] = attention[0::2][: attention[1::2].shape[0]]
    index = feats.global_index.clone()
    index[1::2] = index[0::2][: index[1::2].shape[0]]
    padding = feats.padding_mask
    if padding is not None:
        padding = padding.clone()
        padding[1::2] = padding[0::2][: padding[1::2].shape[0]]
    return TokenFeatures(tokens, attention, index, padding)
