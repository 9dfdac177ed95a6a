"""Action-recognition probe: attentive pooling (one learned query) + a linear classifier,
trained with label smoothing, optional cutmix, flip, RandAugment (:mod:`ivfast.probes.randaug`)
and repeated augmentation (:class:`ivfast.probes.loop.KeyBatches`). Metrics: top-1 and top-5
accuracy (%). :func:`layer_decay_groups` is for fine-tuning the backbone: the frozen probe
has no backbone parameters, so ``classify.layer_decay`` must stay 1.0.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ivfast.data.collate import collate_skip_bad
from ivfast.ops.attention import attention
from ivfast.probes.config import ProbeConfig
from ivfast.probes.features import FeatureCache, FrozenBackbone, load_encoder, tokens_for
from ivfast.probes.loop import KeyBatches, make_loader, pick_device, run_training
from ivfast.probes.randaug import RandAugClips, RandAugment


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """``{"top1": %, "top5": %}``: share of samples whose label is among the k largest logits
    (k capped at the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, logits.shape[-1])
        hit = (logits.topk(kk, dim=-1).indices == labels[:, None]).any(dim=-1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


class QueryPool(nn.Module):
    """(B, N, dim) -> (B, dim): one learned query cross-attends over the LayerNorm'd tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"token width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _h(self, x):
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q = self.q(self.query).expand(x.shape[0], -1, -1)
        o = attention(self._h(q), self._h(self.k(x)), self._h(self.v(x)))
        return self.proj(o.transpose(1, 2).reshape(x.shape[0], -1))


class ClassifyHead(nn.Module):
    def __init__(self, dim: int, heads: int, num_classes: int):
        super().__init__()
        self.pool = QueryPool(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.pool(tokens)))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off).scatter_(1, labels[:, None], 1.0 - smoothing + off)


def cutmix(video: torch.Tensor, target: torch.Tensor, alpha: float, rng: np.random.Generator):
    """Paste a box (the same in every frame) from the batch rolled by one into each clip; the
    soft targets mix by the pasted area. video (B, C, T, H, W), target (B, K)."""
    lam = float(rng.beta(alpha, alpha))
    h, w = video.shape[-2:]
    ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    video = video.clone()
    video[..., y0:y1, x0:x1] = video.roll(1, 0)[..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return video, lam * target + (1 - lam) * target.roll(1, 0)


def layer_decay_groups(encoder, decay: float, weight_decay: float = 0.05, base_lr: float | None = None) -> list[dict]:
    """Parameter groups for fine-tuning ``encoder`` with layer-wise lr decay.

    Layer ids: patch embedding, CLS tokens and position table 0, block i -> i + 1, anything
    else (final norms) depth + 1. Group ``lr_scale`` = decay ** (depth + 1 - id); biases and
    1-d parameters get no weight decay. With ``base_lr`` each group also gets ``lr``.
    """
    if not 0 < decay <= 1:
        raise ValueError(f"layer decay must be in (0, 1], got {decay}")
    depth = len(encoder.blocks)
    groups: dict[tuple, dict] = {}
    for name, p in encoder.named_parameters():
        if name.startswith(("patch_embed", "cls_token", "pos")):
            lid = 0
        elif name.startswith("blocks."):
            lid = int(name.split(".")[1]) + 1
        else:
            lid = depth + 1
        nd = p.ndim <= 1 or name.endswith("bias")
        key = (lid, nd)
        if key not in groups:
            scale = decay ** (depth + 1 - lid)
            groups[key] = {"params": [], "names": [], "layer_id": lid, "lr_scale": scale,
                           "weight_decay": 0.0 if nd else weight_decay}
            if base_lr is not None:
                groups[key]["lr"] = base_lr * scale
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_datasets(cfg: ProbeConfig):
    """(train, val) data sets keyed ``(index, seed)``; the training one with RandAugment when ``randaug``."""
    c = cfg.classify
    if c.data == "synthetic":
        from ivfast.data.synthetic import SyntheticClips

        train = SyntheticClips(c.synthetic_train, c.num_frames, c.img_size, c.num_classes, flip=c.flip, content_seed=0)
        val = SyntheticClips(c.synthetic_val, c.num_frames, c.img_size, c.num_classes, flip=False, content_seed=1)
    else:
        from ivfast.data.video_list import VideoListDataset

        train = VideoListDataset(c.train_list, c.root, c.num_frames, c.img_size, flip=c.flip, train=True)
        val = VideoListDataset(c.val_list, c.root, c.num_frames, c.img_size, flip=False, train=False)
    if c.randaug:
        train = RandAugClips(train, RandAugment(c.randaug_ops, c.randaug_magnitude, c.randaug_magnitude_std,
                                                c.randaug_prob))
    return train, val


def run(cfg: ProbeConfig) -> dict:
    c = cfg.classify
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = FrozenBackbone(load_encoder(cfg.backbone), cfg.backbone.layer).to(device)
    head = ClassifyHead(backbone.width, c.heads, c.num_classes).to(device)
    train, val = build_datasets(cfg)
    # Training features are cacheable only without per-step randomness: then every clip is
    # read with seed 0 (one fixed view), the usual frozen-feature probe practice.
    cache_train = bool(cfg.feature_cache) and c.cutmix_prob == 0 and not c.randaug and c.repeated_aug == 1
    tcache = FeatureCache(cfg.feature_cache, "classify_train") if cache_train else None
    vcache = FeatureCache(cfg.feature_cache, "classify_val") if cfg.feature_cache else None
    rng = np.random.default_rng(cfg.seed)
    tsampler = KeyBatches(len(train), cfg.batch_size, cfg.seed, c.repeated_aug, fixed_seed=0 if cache_train else None)
    vsampler = KeyBatches(len(val), cfg.eval_batch_size, 0, shuffle=False, fixed_seed=0)
    tloader = make_loader(train, tsampler, cfg.num_workers, collate_skip_bad)

    def epoch_batches(epoch, start):
        tsampler.set_position(epoch, start)
        for batch in tloader:
            if batch["video"] is not None:
                yield batch

    def loss_fn(batch):
        target = smooth_one_hot(batch["label"], c.num_classes, c.label_smoothing)
        video = batch["video"]
        if c.cutmix_prob > 0 and rng.random() < c.cutmix_prob:
            video, target = cutmix(video, target, c.cutmix_alpha, rng)
        tokens = tokens_for(backbone, video, batch["index"], tcache, device)
        logits = head(tokens)
        return soft_cross_entropy(logits, target.to(device)), {}

    @torch.no_grad()
    def evaluate():
        logits, labels = [], []
        for batch in make_loader(val, vsampler, cfg.num_workers, collate_skip_bad, persistent=False):
            if batch["video"] is None:
                continue
            logits.append(head(tokens_for(backbone, batch["video"], batch["index"], vcache, device)).cpu())
            labels.append(batch["label"])
        if not logits:
            raise ValueError("no readable validation clips")
        res = topk_accuracy(torch.cat(logits), torch.cat(labels))
        res["num_val"] = int(sum(len(x) for x in labels))
        return res

    # The persistent workers end with tloader, when run returns.
    return run_training(cfg, head, epoch_batches, len(tsampler), loss_fn, evaluate)
