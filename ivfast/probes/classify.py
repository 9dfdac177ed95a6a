"""Action-recognition probe: attentive pooling (one learned query) + a linear classifier,
trained with label smoothing, optional cutmix, flip, RandAugment (:mod:`ivfast.probes.randaug`)
and repeated augmentation (:class:`ivfast.probes.loop.KeyBatches`). Metrics: top-1 and top-5
accuracy (%). :func:`layer_decay_groups` is for fine-tuning the backbone: the frozen probe
has no backbone parameters, so ``classify.layer_decay`` must stay 1.0.

Evaluation as the papers report it:

* Multi-view testing (:class:`MultiViewClips`): each validation video gives
  ``classify.test_clips`` x ``classify.test_crops`` views; each view is classified and the
  views' softmax probabilities are averaged (``classify.test_average: softmax``, as the
  ``merge`` of VideoMAE-style fine-tuning code does: a view's scores are a probability
  distribution, so one over-confident view cannot outvote the others by its logit scale;
  ``logits`` averages the logits instead). Clip k of K of a list video takes, in each of the
  ``num_frames`` TSN segments, the middle of the segment's k-th of K equal parts (K = 1: the
  segment middles, the single-view clip); the crops are ``test_crops`` squares of
  ``img_size`` spread evenly along the long side of the frame resized to short side
  ``img_size`` (one crop: the centre, the single-view crop).
* Several heads (:class:`ClassifyHeads`), one per (lr, weight decay) of the grid
  ``classify.sweep.lr`` x ``classify.sweep.weight_decay``, trained in one pass: the backbone
  runs once per batch, every head sees the same batch, each has its own AdamW groups. The
  reported head is the one with the best validation top-1 (ties: top-5, then the first),
  chosen on the set it is reported on (as a sweep over heads is usually reported: optimistic).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ivfast.data.collate import collate_skip_bad, sample_key
from ivfast.ops.attention import attention
from ivfast.probes.config import ProbeConfig
from ivfast.probes.features import (
    FeatureCache,
    FrozenBackbone,
    load_encoder,
    tokens_for,
)
from ivfast.probes.loop import (
    KeyBatches,
    make_loader,
    param_groups,
    pick_device,
    run_training,
)
from ivfast.probes.randaug import RandAugClips, RandAugment

logger = logging.getLogger("ivfast.data")


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


class ClassifyHeads(nn.Module):
    """``n`` independent :class:`ClassifyHead` s on the same tokens: ``(B, N, D) -> (n, B, classes)``."""

    def __init__(self, dim: int, heads: int, num_classes: int, n: int = 1):
        super().__init__()
        self.heads = nn.ModuleList(ClassifyHead(dim, heads, num_classes) for _ in range(n))
        self._register_load_state_dict_pre_hook(self._single_head_keys)

    @staticmethod
    def _single_head_keys(state_dict, prefix, *args):
        """A single :class:`ClassifyHead`'s state (a checkpoint from before the sweep) loads as head 0."""
        for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "heads.")]:
            state_dict[f"{prefix}heads.0.{k[len(prefix):]}"] = state_dict.pop(k)

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(tokens) for h in self.heads])


def sweep_settings(cfg: ProbeConfig) -> list[dict]:
    """``[{"lr", "weight_decay"}]``, one per head: the grid ``classify.sweep.lr`` x
    ``classify.sweep.weight_decay`` (lr-major), an empty list standing for ``lr`` / ``weight_decay``."""
    s = cfg.classify.sweep
    lrs = [float(x) for x in s.lr] or [float(cfg.lr)]
    wds = [float(x) for x in s.weight_decay] or [float(cfg.weight_decay)]
    return [{"lr": lr, "weight_decay": wd} for lr in lrs for wd in wds]


def sweep_groups(heads: ClassifyHeads, settings: list[dict], base_lr: float) -> list[dict]:
    """AdamW groups of every head: its :func:`ivfast.probes.loop.param_groups` with its weight
    decay, ``lr_scale`` = its lr / ``base_lr`` (so the shared cosine schedule, warm-up and
    min_lr scale to each head's lr) and ``head`` = its index."""
    groups = []
    for i, (head, s) in enumerate(zip(heads.heads, settings)):
        for g in param_groups(head, s["weight_decay"]):
            groups.append({**g, "lr_scale": s["lr"] / base_lr, "head": i})
    return groups


def best_head(per_head: list[dict]) -> int:
    """Index of the head with the highest top-1 (ties: higher top-5, then the lower index)."""
    return max(range(len(per_head)), key=lambda i: (per_head[i]["top1"], per_head[i].get("top5", 0.0), -i))


# ----------------------------------------------------------------------------- multi-view testing
def crop_offsets(h: int, w: int, size: int, crops: int) -> list[tuple[int, int]]:
    """``(y0, x0)`` of ``crops`` squares of ``size`` in an ``h`` x ``w`` frame, spread evenly
    along its long side (first, ..., last; one crop: the centre), centred along the short side."""
    def spread(length: int) -> list[int]:
        if crops == 1:
            return [(length - size) // 2]
        return [(i * (length - size)) // (crops - 1) for i in range(crops)]

    if h > w:
        return [(y, (w - size) // 2) for y in spread(h)]
    return [((h - size) // 2, x) for x in spread(w)]


def crop_views(frames, size: int, crops: int, mean=None, std=None) -> torch.Tensor:
    """uint8 frames ``(T, H, W, 3)`` -> float32 ``(crops, 3, T, size, size)``: the short side
    resized to ``size`` (as :func:`ivfast.data.transforms.eval_transform`, whose centre crop
    is the one-crop view), then :func:`crop_offsets` crops, normalised."""
    from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_short_side

    x = resize_short_side(frames, size)
    new_h, new_w = x.shape[-2:]
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    return torch.stack([normalize(x[:, :, y:y + size, x0:x0 + size], mean, std)
                        for y, x0 in crop_offsets(new_h, new_w, size, crops)])


class MultiViewClips(Dataset):
    """Validation samples as ``clips`` x ``crops`` views: ``__getitem__((index, seed))`` ->
    ``{"video": float32 (clips * crops, 3, num_frames, size, size) (clip-major), "label",
    "index"}`` or ``None`` for an unreadable video (one warning naming it, as the data sets do).

    ``base`` is either a ``VideoListDataset`` (``train=False``): its video (or folder of
    frames) is decoded once, ``num_frames * clips`` TSN middles, and clip k is frames
    ``k::clips`` (in each of the ``num_frames`` segments the middle of its k-th of ``clips``
    parts); then :func:`crop_views`. Or a data set of normalised clips of ``num_frames *
    clips`` frames (``SyntheticClips``): clip k is frames ``k * num_frames .. (k + 1) *
    num_frames - 1``, the crops cut from its frames without resizing. One view (1 x 1) is the
    single-view evaluation clip.
    """

    def __init__(self, base, num_frames: int, clips: int = 1, crops: int = 1, size: int | None = None):
        size = int(size if size is not None else base.size)  # default: the base data set's size
        if num_frames < 1 or clips < 1 or crops < 1:
            raise ValueError(f"MultiViewClips: bad num_frames={num_frames} clips={clips} crops={crops}")
        self.base, self.num_frames, self.clips, self.crops, self.size = base, num_frames, clips, crops, size
        self.from_list = hasattr(base, "entries")

    @property
    def views(self) -> int:
        return self.clips * self.crops

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if self.from_list:
            return self._list_item(key)
        item = self.base[key]
        if item is None:
            return None
        video = torch.as_tensor(item["video"])
        f, s = self.num_frames, self.size
        if video.shape[1] < f * self.clips:
            raise ValueError(f"MultiViewClips: the base clip has {video.shape[1]} frames, {f} x {self.clips} needed")
        views = []
        for k in range(self.clips):
            clip = video[:, k * f:(k + 1) * f]
            views += [clip[..., y:y + s, x:x + s] for y, x in crop_offsets(clip.shape[-2], clip.shape[-1], s, self.crops)]
        return {"video": torch.stack(views).contiguous(), "label": item["label"], "index": item["index"]}

    def _list_item(self, key):
        from ivfast.data.video_list import failure_reason, read_entry

        index, _ = sample_key(key)
        b = self.base
        if not 0 <= index < len(b.entries):
            raise IndexError(f"MultiViewClips: index {index} out of range [0, {len(b.entries)})")
        entry = b.entries[index]
        n = self.num_frames * self.clips
        try:
            frames = read_entry(entry, n, None, 0, template=b.frame_template, min_frames=b.min_frames,
                                timeout_s=b.decode_timeout_s)
            video = torch.cat([crop_views(frames[k::self.clips], self.size, self.crops, b.mean, b.std)
                               for k in range(self.clips)])
        except Exception as e:  # noqa: BLE001 - any failure of one sample is reported, not raised
            logger.warning("cannot read video %s: %s", entry.path, failure_reason(e))
            return None
        return {"video": video, "label": entry.label, "index": index}


class _EachView:
    """Calls the backbone on ``(B, V, C, T, H, W)`` views, ``chunk`` clips at a time: ``(B, V, N, D)``."""

    def __init__(self, backbone, chunk: int):
        self.backbone, self.chunk = backbone, max(1, int(chunk))

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return self.backbone.extract(video.flatten(0, 1), self.chunk).unflatten(0, tuple(video.shape[:2]))


def combine_views(logits: torch.Tensor, how: str = "softmax") -> torch.Tensor:
    """``(..., V, classes)`` view logits -> ``(..., classes)`` video scores: the mean of the
    views' softmax probabilities (``softmax``) or of their logits (``logits``)."""
    logits = logits.float()
    if how == "softmax":
        return logits.softmax(-1).mean(-2)
    if how == "logits":
        return logits.mean(-2)
    raise ValueError(f"unknown view average {how!r} (softmax | logits)")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets ``(B, classes)``, in float32: the mean over the batch,
    one per leading index of ``logits`` (``(heads, B, classes)`` -> ``(heads,)``)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean(-1)


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


def _base_datasets(cfg: ProbeConfig):
    c = cfg.classify
    if c.data == "synthetic":
        from ivfast.data.synthetic import SyntheticClips

        train = SyntheticClips(c.synthetic_train, c.num_frames, c.img_size, c.num_classes, flip=c.flip, content_seed=0)
        val = SyntheticClips(c.synthetic_val, c.num_frames * c.test_clips, c.img_size, c.num_classes, flip=False,
                             content_seed=1)
    else:
        from ivfast.data.video_list import VideoListDataset

        train = VideoListDataset(c.train_list, c.root, c.num_frames, c.img_size, flip=c.flip, train=True,
                                 frame_template=c.frame_template)
        val = VideoListDataset(c.val_list, c.root, c.num_frames, c.img_size, flip=False, train=False,
                               frame_template=c.frame_template)
    return train, val


def build_datasets(cfg: ProbeConfig):
    """(train, val) data sets keyed ``(index, seed)``; the training one with RandAugment when
    ``randaug``; the validation one a :class:`MultiViewClips` of ``test_clips`` x ``test_crops`` views."""
    c = cfg.classify
    train, val = _base_datasets(cfg)
    val = MultiViewClips(val, c.num_frames, c.test_clips, c.test_crops, c.img_size)
    if c.randaug:
        aug = (RandAugment.from_string(c.randaug_timm) if c.randaug_timm else
               RandAugment(c.randaug_ops, c.randaug_magnitude, c.randaug_magnitude_std, c.randaug_prob))
        train = RandAugClips(train, aug)
    return train, val


def run(cfg: ProbeConfig, encoder=None) -> dict:
    """``encoder``: the backbone already loaded from ``cfg.backbone`` (the CLI's), else loaded here."""
    c = cfg.classify
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = FrozenBackbone(encoder or load_encoder(cfg.backbone), cfg.backbone.layer).to(device)
    settings = sweep_settings(cfg)
    head = ClassifyHeads(backbone.width, c.heads, c.num_classes, len(settings)).to(device)
    train, val = build_datasets(cfg)
    # Training features are cacheable only without per-step randomness: then every clip is
    # read with seed 0 (one fixed view), the usual frozen-feature probe practice.
    cache_train = bool(cfg.feature_cache) and c.cutmix_prob == 0 and not c.randaug and c.repeated_aug == 1
    tcache = FeatureCache(cfg.feature_cache, "classify_train") if cache_train else None
    # Cached per video: the tokens of its views, (views, N, D).
    vcache = FeatureCache(cfg.feature_cache, f"classify_val_{c.test_clips}x{c.test_crops}") if cfg.feature_cache else None
    rng = np.random.default_rng(cfg.seed)
    tsampler = KeyBatches(len(train), cfg.batch_size, cfg.seed, c.repeated_aug, fixed_seed=0 if cache_train else None)
    # eval_batch_size counts clips through the backbone: a batch holds eval_batch_size // views videos (>= 1).
    vsampler = KeyBatches(len(val), max(1, cfg.eval_batch_size // val.views), 0, shuffle=False, fixed_seed=0)
    each_view = _EachView(backbone, cfg.eval_batch_size)
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
        logits = head(tokens)  # (heads, B, classes)
        target = target.to(device)
        # Each head's mean loss, summed: every head gets exactly its own loss's gradient.
        per = soft_cross_entropy(logits, target)
        logs = {"head_losses": [round(x, 6) for x in per.detach().tolist()]} if len(head) > 1 else {}
        return per.sum(), logs

    @torch.no_grad()
    def evaluate():
        scores, labels = [], []
        for batch in make_loader(val, vsampler, cfg.num_workers, collate_skip_bad, persistent=False):
            if batch["video"] is None:
                continue
            tok = tokens_for(each_view, batch["video"], batch["index"], vcache, device)  # (B, views, N, D)
            logits = head(tok.flatten(0, 1)).unflatten(1, tuple(tok.shape[:2]))  # (heads, B, views, classes)
            scores.append(combine_views(logits, c.test_average).cpu())
            labels.append(batch["label"])
        if not scores:
            raise ValueError("no readable validation clips")
        scores, labels = torch.cat(scores, 1), torch.cat(labels)
        per_head = [{"head": i, **s, **topk_accuracy(scores[i], labels)} for i, s in enumerate(settings)]
        best = best_head(per_head)
        return {"top1": per_head[best]["top1"], "top5": per_head[best]["top5"], "num_val": int(labels.numel()),
                "best_head": best, "lr": settings[best]["lr"], "weight_decay": settings[best]["weight_decay"],
                "test_views": {"clips": c.test_clips, "crops": c.test_crops, "average": c.test_average},
                "heads": per_head}

    # The persistent workers end with tloader, when run returns.
    return run_training(cfg, head, epoch_batches, len(tsampler), loss_fn, evaluate,
                        groups=sweep_groups(head, settings, cfg.lr), checkpoint_meta={"heads": settings})
