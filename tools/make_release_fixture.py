"""Write tests/fixtures/release/: a tiny encoder made by the authors' own model class, and its output.

    IVFAST_RELEASE=/path/to/InternVideo-Next python tools/make_release_fixture.py [--out DIR]

Builds the release's ``InternVideo2`` (``models/InternVideo_next.py``, the published encoders'
class) at a tiny size on its published code path (flash attention, fused RMSNorm and fused MLP
on; their CUDA kernels replaced by the plain stand-ins of ``tests/release_stubs.py``), redraws
every parameter from a fixed seed, and saves:

- ``encoder_tiny.safetensors``: its ``state_dict()``, the release's key layout (``patch_embed.*``,
  ``cls_token``, ``pos_embed``, ``blocks.*``, ``clip_projector.*``), float32;
- ``io_tiny.safetensors``: ``clip_uint8`` (1, 3, T, H, W) uint8 RGB pixels, and ``patch_tokens``:
  the model's ``forward`` on that clip normalised with ``mean`` / ``std`` (float32, computed in
  float64 from the pixels), i.e. ``model(((clip / 255) - mean) / std)``;
- ``tiny.json``: the constructor arguments, normalisation, seed and provenance.

The model's forward takes no mask (the published class encodes every token). ivfast's import
(``ivfast-export --from-release``) must reproduce ``patch_tokens`` within 1e-5
(tests/integration/test_release_import.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from ivfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tests.release_stubs import RELEASE_ENV, build_release_encoder, load_release_module, release_root  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "release")
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD  # the release's input normalisation
# Small enough for the repository (< 300 KB in all); the fixture's own sizes, not the TINY of the parity test.
CONFIG = dict(img_size=56, patch_size=14, num_frames=4, tubelet_size=1, embed_dim=32, depth=2, num_heads=4,
              mlp_ratio=4.0, cls_token_num=4, attn_pool_num_heads=4, clip_embed_dim=16, init_values=0.1,
              drop_path_rate=0.0, qkv_bias=False, qk_normalization=True)
SEED, CLIP_SEED = 0, 1


def clip_pixels(seed: int = CLIP_SEED) -> torch.Tensor:
    """(1, 3, T, H, W) uint8: smooth moving gradients plus noise, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    t, s = CONFIG["num_frames"], CONFIG["img_size"]
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(s), torch.arange(s), indexing="ij")
    base = torch.stack([(xx + 3 * tt) * 4.0, (yy * 3 + 5 * tt) * 1.0, (xx + yy) * 2.0]) % 256
    noise = torch.randint(0, 64, (3, t, s, s), generator=g).double()
    return ((base.double() + noise) % 256).to(torch.uint8)[None]


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, T, H, W) -> float32 ((p / 255) - mean) / std, computed in float64."""
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1, 1)
    return ((pixels.double() / 255.0 - mean) / std).float()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    root = release_root()
    if root is None:
        print(f"set {RELEASE_ENV} to the InternVideo-Next folder of the release", file=sys.stderr)
        return 2
    from safetensors.torch import save_file

    warnings.simplefilter("ignore", FutureWarning)  # the release's torch.cuda.amp.autocast decorator
    module = load_release_module(root)
    model = build_release_encoder(module, fused=True, seed=SEED, **CONFIG)
    pixels = clip_pixels()
    with torch.no_grad():
        tokens = model(normalise(pixels))
    os.makedirs(args.out, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"source": "InternVideo-Next models/InternVideo_next.py InternVideo2, random weights (tools/make_release_fixture.py)"}
    save_file(state, os.path.join(args.out, "encoder_tiny.safetensors"), metadata=meta)
    save_file({"clip_uint8": pixels.contiguous(), "patch_tokens": tokens.contiguous()},
              os.path.join(args.out, "io_tiny.safetensors"), metadata=meta)
    info = {
        "made_by": "tools/make_release_fixture.py",
        "release_class": "models/InternVideo_next.py: InternVideo2",
        "constructor": {**CONFIG, "use_flash_attn": True, "use_fused_rmsnorm": True, "use_fused_mlp": True},
        "seed": SEED, "clip_seed": CLIP_SEED, "mean": list(MEAN), "std": list(STD),
        "input": "model(((clip_uint8 / 255) - mean) / std), float32; forward(x) returns x[:, cls_token_num:]",
        "output_shape": list(tokens.shape),
    }
    with open(os.path.join(args.out, "tiny.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out}: {len(state)} release tensors, output {tuple(tokens.shape)}, {total / 1024:.0f} KiB in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
