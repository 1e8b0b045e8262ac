"""Pictures of quantization error, for a tensor or every Linear weight of a checkpoint.

Three PNGs (matplotlib, Agg backend):

* ``ptq_block_error.png``  distribution (CDF) of the relative error per block of 32 consecutive
  elements, ``||x_b - x_hat_b|| / ||x_b||``, under NVFP4, MXFP4 and FP8 (per tensor). 32 is MXFP4's
  block and two NVFP4 blocks, so every scheme is judged on the same element groups.
* ``ptq_nvfp4_scales.png``  histogram of log2 of NVFP4's E4M3 block decode scales ``s_dec_b``, with
  E4M3's subnormal range, smallest normal and max 448 marked (zero scales counted in the legend).
* ``ptq_flush_to_zero.png``  fraction of non-zero values that dequantize to 0, per scheme and per layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .metrics import flushed_to_zero, sqnr_db
from .quantize import quantize

__all__ = ["EXPLORE_SCHEMES", "block_errors", "explore", "load_tensors", "summarize"]

EXPLORE_SCHEMES = ("nvfp4", "mxfp4", "fp8")
ERROR_BLOCK = 32
COLORS = {"nvfp4": "tab:green", "mxfp4": "tab:orange", "fp8": "tab:blue"}


def _matrix(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


def block_errors(x: torch.Tensor, x_hat: torch.Tensor, block: int = ERROR_BLOCK) -> torch.Tensor:
    """Relative L2 error of each block of ``block`` consecutive elements along the last dim (all-zero blocks dropped)."""
    xb, hb = _matrix(x).reshape(-1, block).double(), _matrix(x_hat).reshape(-1, block).double()
    norm = xb.norm(dim=1)
    keep = norm > 0
    return ((xb - hb).norm(dim=1)[keep] / norm[keep]).float()


def load_tensors(tensor: str | None = None, model: str | None = None, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors to explore: a ``.pt`` file (a tensor or a dict of them) or a model's Linear weights.

    Only floating tensors with >= 2 dims and a last dim divisible by 32 are kept (that is what the
    three schemes tile); ``lm_head`` is left out of models, as PTQ leaves it in high precision.
    """
    if (tensor is None) == (model is None):
        raise ValueError("give exactly one of tensor= or model=")
    if tensor is not None:
        obj = torch.load(tensor, map_location="cpu", weights_only=True)
        items = obj.items() if isinstance(obj, dict) else [(Path(tensor).stem, obj)]
    else:
        from .eval import load_hf_model

        net, _ = load_hf_model(model)
        items = [
            (n, m.weight) for n, m in net.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        ]  # fmt: skip
    out = {
        n: t.detach().float() for n, t in items
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2 and t.shape[-1] % ERROR_BLOCK == 0
    }  # fmt: skip
    if not out:
        raise ValueError("nothing to explore: need float tensors with >= 2 dims and a last dim divisible by 32")
    return dict(list(out.items())[:limit]) if limit else out


def summarize(tensors: dict[str, torch.Tensor]) -> dict:
    """Per layer and scheme: SQNR, flushed fraction, block errors; NVFP4 block scales."""
    per_layer: dict[str, dict[str, dict]] = {}
    errors = {s: [] for s in EXPLORE_SCHEMES}
    scales = []
    for name, x in tensors.items():
        per_layer[name] = {}
        for s in EXPLORE_SCHEMES:
            q = quantize(x, s)
            x_hat = q.dequantize()
            per_layer[name][s] = {"sqnr_db": sqnr_db(x, x_hat), "flushed": flushed_to_zero(x, x_hat)}
            errors[s].append(block_errors(x, x_hat))
            if s == "nvfp4":
                scales.append(q.scales.float().reshape(-1))
    return {
        "per_layer": per_layer,
        "block_errors": {s: torch.cat(e) for s, e in errors.items()},
        "nvfp4_scales": torch.cat(scales),
    }



def _save(fig, path: Path) -> Path:
    """Write a figure (tight layout, 110 dpi), close it, and return its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def explore(
    tensors: dict[str, torch.Tensor], out_dir: str | Path, title: str = "", summary: dict | None = None
) -> list[Path]:
    """Write the three PNGs for ``tensors`` into ``out_dir`` (``summary``: ``summarize(tensors)`` if done); their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary or summarize(tensors)
    n = sum(t.numel() for t in tensors.values())
    what = title or (next(iter(tensors)) if len(tensors) == 1 else f"{len(tensors)} tensors")
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s, e in summary["block_errors"].items():
        e = torch.sort(e.clamp_min(1e-8)).values
        cdf = torch.arange(1, e.numel() + 1) / e.numel()
        ax.plot(e.numpy(), cdf.numpy(), color=COLORS[s], label=f"{s}: median {float(e.median()):.3f}")
    ax.set_xscale("log")
    low = min(float(torch.quantile(e[:100_000].clamp_min(1e-8), 0.001)) for e in summary["block_errors"].values())
    ax.set_xlim(left=low / 2)  # exact (zero-error) blocks are drawn at 1e-8; do not let them set the scale
    ax.set_xlabel(f"relative L2 error per block of {ERROR_BLOCK} elements")
    ax.set_ylabel("fraction of blocks")
    ax.set_title(f"Block error, {what} ({n / 1e6:.2f}M values)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    paths.append(_save(fig, out / "ptq_block_error.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    sc = summary["nvfp4_scales"]
    zero = int((sc == 0).sum())
    logs = torch.log2(sc[sc > 0]).numpy()
    ax.hist(logs, bins=120, color=COLORS["nvfp4"], label=f"{sc.numel() - zero} non-zero scales; {zero} zero")
    ax.axvspan(-9, -6, color="grey", alpha=0.2, label="E4M3 subnormal range")
    ax.axvline(torch.log2(torch.tensor(448.0)).item(), color="red", ls="--", label="E4M3 max 448")
    ax.set_xlabel("log2 of NVFP4 block decode scale (E4M3)")
    ax.set_ylabel("blocks")
    ax.set_title(f"NVFP4 block scales, {what}")
    ax.legend()
    paths.append(_save(fig, out / "ptq_nvfp4_scales.png"))

    fig, ax = plt.subplots(figsize=(8, 4.2))
    layers = list(summary["per_layer"])
    for s in EXPLORE_SCHEMES:
        vals = [100 * summary["per_layer"][k][s]["flushed"] for k in layers]
        ax.plot(range(len(layers)), vals, marker="o", ms=3, color=COLORS[s],
                label=f"{s}: {sum(vals) / len(vals):.2f}% on average")  # fmt: skip
    ax.set_xlabel("tensor (in checkpoint order)" if len(layers) > 1 else layers[0])
    ax.set_ylabel("% of non-zero values flushed to 0")
    ax.set_title(f"Flushed to zero, {what}")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "ptq_flush_to_zero.png"))
    return paths
