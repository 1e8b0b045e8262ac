"""Train the harness GPT on Shakespeare under one recipe, top to bottom (nanoGPT's ``train.py`` shape).

    data     = load_corpus(...)                               # cached dense GPT-2 ids, fixed val split
    model    = build_model(GPTConfig, recipe)                 # GPT, then fourbit.nn.convert unless bf16
    for step in range(start, steps):
        set_progress(model, step / steps)                     # the late-BF16 switch reads this
        loss, gnorm = train_step(model, opt, *sampler.batch(step), lr_at(step))
        every log_every:  one line of metrics.jsonl (train loss averaged over the interval)
        every eval_every: val loss on a fixed set of held-out windows
        every ckpt_every, at the end and on Ctrl-C / SIGTERM: ckpt.pt

What a run directory guarantees (``docs/training.md`` has the user's view):

    nothing lost      a directory that holds a run (``run.json``, ``metrics.jsonl``, ``ckpt.pt``,
                      ``ckpt_dcp/``) is never wiped by a rerun: ``resume=True`` continues it, ``overwrite=True``
                      deletes it, and neither is a ``ValueError`` naming the files. Ctrl-C and SIGTERM stop
                      at a step boundary, checkpoint, release ``.lock`` and raise ``Interrupted``.
    nothing damaged   ``ckpt.pt`` is written to a temporary file and renamed (a crash leaves the previous
    goes unseen       one; stale temporaries are removed at the next start) and carries a CRC-32 of every
                      tensor and value in it (``checksums``), verified before a resume uses any of it. A
                      checkpoint that cannot be read or does not match, a ``run.json`` that is not JSON, a
                      ``metrics.jsonl`` line that is not a record: a ``ValueError`` naming the file and what
                      to do. The one repair made silently is the expected one: the last line of
                      ``metrics.jsonl`` torn by a kill mid-write is cut on resume (with every record past
                      the checkpoint's step).
    no silent restart ``resume=True`` on a directory whose run has no checkpoint (killed before the first
                      one) says on stderr that it starts from step 0.

Bit-exact resume: a batch is a pure function of ``(seed, step)`` and the LR of ``step``, so a checkpoint
holds the model, the optimizer, the step, the partial train-loss sum of the current log interval, torch's
RNG states and the stochastic-rounding counters (``fourbit.nn.rng_state``); ``metrics.jsonl`` is cut back
to the checkpoint's step on resume, so an interrupted-and-resumed run writes the same losses as an
uninterrupted one (timings aside).

Precision: on CUDA every forward runs under ``torch.autocast(bfloat16)``, so the ``bf16`` recipe is the
usual BF16 mixed-precision baseline. On the CPU the baseline computes in FP32 (CPU BF16 matmuls are slow
and the quantized recipes' reference path computes in FP32 anyway); it is then a slightly higher-precision
baseline, which only makes the gaps to it conservative.

The step stays GPU-friendly: losses and grad-norms are accumulated as device tensors and read back
(``.item()``) only at log intervals. Data parallel (``parallel="ddp"|"fsdp2"`` under torchrun, ``fourbit/harness/parallel.py``): ``batch_size``
is the global batch, split evenly over ranks; only rank 0 writes metrics, shows the bar and writes
``run.json``; checkpoints are sharded DCP directories (``ckpt_dcp/``) that resume on any number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from . import parallel as par
from .corpus import CORPORA, SHAKESPEARE, load_corpus
from .data import BatchSampler, check_data_dir, val_windows
from .model import GPT, GPTConfig, get_preset

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train_config", "compile_mode", "resolve_recipe", "build_model", "make_optimizer", "train_step",
           "evaluate", "lr_at", "train", "read_metrics", "load_checkpoint", "checksums", "Interrupted"]  # fmt: skip

METRICS = "metrics.jsonl"
CHECKPOINT = "ckpt.pt"
RUN_META = "run.json"
LOCK = ".lock"
CHECKSUMS = "checksums"  # the checkpoint's key for {entry path: CRC-32} of everything else in it
_TEMP_PATTERNS = (f"{CHECKPOINT}.tmp*", f"{METRICS}.tmp*", ".write-test-*")  # left by a process that died mid-write
_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # stop at a step boundary, checkpoint, exit


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = "bf16"
    preset: str = "tiny"
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # cosine decay to lr * min_lr_frac
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 40
    eval_tokens: int = 8192  # held-out target tokens per evaluation (fixed windows)
    ckpt_every: int = 50
    seed: int = 0  # model init, data order and the stochastic-rounding seed
    tokenizer: str = "gpt2-4k"
    corpus: str = SHAKESPEARE  # fourbit.harness.corpus.CORPORA: "shakespeare" or "debian-en" (~20M tokens)
    device: str = "auto"
    compile: bool | None = None  # None: compiled on CUDA (one process, no cuda_graph), eager elsewhere; see compile_mode
    data_dir: str | None = None
    parallel: str = "none"  # "ddp" or "fsdp2" under torchrun
    cuda_graph: bool = False  # capture the step in a CUDA graph and replay it (fourbit.harness.graphs)

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "eval_every", "eval_tokens", "ckpt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; choose from {', '.join(CORPORA)}")
        if self.eval_every % self.log_every:
            raise ValueError(f"eval_every={self.eval_every} must be a multiple of log_every={self.log_every}")
        if self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be >= 0, got {self.seed}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if par.parse(self.parallel) is not par.Parallel.NONE and self.cuda_graph:  # parse: ValueError listing the modes
            raise ValueError(f"cuda_graph runs one process; parallel={self.parallel!r} is not captured")
        if self.cuda_graph and self.compile:
            raise ValueError("cuda_graph and compile are exclusive (capture the eager step, or compile it)")
        if self.compile not in (None, True, False):
            raise ValueError(f"TrainConfig.compile must be True, False or None (auto), got {self.compile!r}")


def compile_mode(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> str | None:
    """The ``torch.compile`` mode the harness runs the model under, or None for eager.

    On one CUDA device the default (``compile=None``) and ``compile=True`` are ``"reduce-overhead"``:
    Inductor's graph with CUDA graphs, the fast path of a quantized model (plain ``torch.compile`` leaves
    a quantized step host-bound on the quantize kernels' launches: benchmarks/RESULTS.md). Under DDP/FSDP2
    ``compile=True`` is plain ``torch.compile`` and the default stays eager; on CPU ``compile=True``
    compiles (the reference ops run inside the graph) and the default stays eager. ``--cuda-graph`` is the
    hand-captured eager step instead, and so never compiles."""
    if cfg.compile is False or cfg.cuda_graph:
        return None
    single_cuda = device.type == "cuda" and world_size == 1
    if cfg.compile is None:
        return "reduce-overhead" if single_cuda else None
    return "reduce-overhead" if single_cuda else "default"


# What changes with the preset besides the model (fourbit.harness.model.PRESETS).
TRAIN_PRESETS: dict[str, dict] = {
    # 200 steps x 1,024 tokens = 0.2M tokens (0.12 epoch): a first look, not a converged model
    "tiny": dict(steps=200, batch_size=8, lr=3e-3, warmup=20, log_every=10, eval_every=40, eval_tokens=8192,
                 ckpt_every=50, tokenizer="gpt2-4k"),  # fmt: skip
    # 600 steps x 2,048 tokens = 1.2M tokens (0.7 epoch)
    "small": dict(steps=600, batch_size=8, lr=2e-3, warmup=40, log_every=10, eval_every=50, eval_tokens=32768,
                  ckpt_every=100, tokenizer="gpt2-4k"),  # fmt: skip
    # 600 steps x 16,384 tokens = 9.8M tokens (7 epochs of this 1.4M-token corpus: a 100M model will start
    # to overfit late in the run; the recipes stay paired, so their gaps remain comparable)
    "gpu": dict(steps=600, batch_size=32, lr=1e-3, warmup=60, log_every=10, eval_every=50, eval_tokens=131072,
                ckpt_every=200, tokenizer="gpt2"),  # fmt: skip
}


def train_config(preset: str = "tiny", **overrides) -> TrainConfig:
    """The preset's training settings with ``overrides`` (``None`` values are ignored)."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(TRAIN_PRESETS)}")
    kw = dict(TRAIN_PRESETS[preset], preset=preset)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**kw)


def resolve_recipe(name: str, seed: int = 0):
    """``fourbit.recipes.get_recipe(name)`` with its stochastic-rounding seed set to the run's ``seed``;
    ``None`` for ``bf16`` (no conversion at all). Unknown names raise ``ValueError``."""
    try:
        from ..recipes import get_recipe
    except ModuleNotFoundError as e:
        if name == "bf16":
            return None
        raise ValueError(f"recipe {name!r} needs fourbit.recipes, which is not importable ({e})") from e
    recipe = get_recipe(name)
    if not recipe.quantized and recipe.switch_to_bf16_at is None:
        return None
    return replace(recipe, seed=seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def build_model(cfg: GPTConfig, recipe, device: torch.device, seed: int = 0) -> GPT:
    """A freshly initialised GPT (init drawn from ``seed``), converted to ``recipe`` (None: left as is)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    if recipe is not None:
        from .. import nn as fnn

        model = fnn.convert(model, recipe)
    return model.to(device)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linears, the tied embedding), none on anything 1-D. With
    ``cfg.cuda_graph`` it is capturable, its learning rate a device tensor that ``train_step`` fills."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.cuda_graph:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        lr = torch.tensor(cfg.lr, dtype=torch.float32, device=device)
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``lr * min_lr_frac`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _autocast(device: torch.device, cache_enabled: bool = True):
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)


def train_step(model, opt, x, y, lr: float, grad_clip: float, device: torch.device):
    """One optimizer step on batch ``(x, y)``; returns the loss and the pre-clip grad-norm as device tensors."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a capturable optimizer's LR lives on the device
        else:
            group["lr"] = lr
    with _autocast(device):
        _, loss = model(x, y)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), gnorm.detach()


@torch.no_grad()
def evaluate(model, xv: torch.Tensor, yv: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy (nats/token) over the fixed validation windows."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(0, xv.size(0), batch_size):
        x, y = xv[i : i + batch_size].to(device), yv[i : i + batch_size].to(device)
        with _autocast(device):
            _, loss = model(x, y)
        total += loss.double() * x.size(0)
    model.train(was_training)
    return float(total / xv.size(0))


def _writable_dir(out: Path) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output directory {str(out)!r} is not writable ({e.strerror or e})") from e
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a Ctrl-C or crash mid-write never leaves a torn checkpoint


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_stale_temps(out: Path) -> list[Path]:
    """Delete the temporary files a killed process left mid-write (the caller holds the run's lock, so
    no live process is writing them); returns what was removed."""
    stale = [p for pattern in _TEMP_PATTERNS for p in out.glob(pattern) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _notice(text: str) -> None:
    print(f"fourbit: {text}", file=sys.stderr, flush=True)


# -- checkpoint integrity -------------------------------------------------------------------------------------


def _crc(value) -> int:
    """CRC-32 of a tensor (dtype, shape and bytes) or of a plain value's repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        head = f"{t.dtype}{tuple(t.shape)}".encode()
        return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), zlib.crc32(head))
    return zlib.crc32(repr(value).encode())


def checksums(obj, prefix: str = "") -> dict[str, int]:
    """``{path: CRC-32}`` of every leaf of a nested dict/list/tuple of tensors and plain values (paths like
    ``model/blocks.0.attn.c_attn.weight`` or ``optimizer/state/3/exp_avg``)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {prefix: _crc(obj)}
    out: dict[str, int] = {}
    for k, v in items:
        out.update(checksums(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def _damaged(path: Path, why: str) -> ValueError:
    return ValueError(f"checkpoint {str(path)!r} {why}; it cannot be resumed: move it away and rerun with "
                      f"--resume (which then starts from step 0), or start over with --overwrite")  # fmt: skip


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load`` a ``ckpt.pt`` onto the CPU and verify it against its ``checksums``; a file that is
    empty, truncated, not a checkpoint or damaged is a ``ValueError`` naming it and saying what to do.
    A checkpoint without checksums (from an older fourbit) loads with a notice."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, pickle.UnpicklingError, RuntimeError, ValueError, OSError) as e:
        why = " ".join(str(e).split()) or "empty or truncated"
        raise _damaged(path, f"cannot be read ({type(e).__name__}: {why[:200]})") from None
    if not isinstance(ck, dict) or "step" not in ck:
        raise _damaged(path, f"is not a fourbit training checkpoint (a {type(ck).__name__} without 'step')")
    want = ck.pop(CHECKSUMS, None)
    if want is None:
        _notice(f"checkpoint {str(path)!r} has no checksums (written by an older fourbit): loaded unverified")
        return ck
    got = checksums(ck)
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise _damaged(path, f"is damaged: {len(bad)} of {len(want)} entries do not match their checksums ({shown})")
    return ck


def _fnn():
    try:
        from .. import nn as fnn
    except ModuleNotFoundError:
        return None
    return fnn


def _scalar(t: torch.Tensor) -> float:
    """A 0-dim tensor (a DTensor under FSDP2) as a float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (none if absent); a line that is not a record with a
    ``step`` is a ``ValueError`` naming the file and line (a torn last line: ``resume`` cuts it)."""
    records, torn = _read_metrics(Path(run_dir) / METRICS)
    if torn is not None:
        raise ValueError(f"{torn}; resuming the run (--resume) cuts it")
    return records


def _read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """(records, what is wrong with the last line or None). A last line without its newline that is not
    JSON was torn by a kill mid-write; any other bad line is a ``ValueError``."""
    if not path.exists():
        return [], None
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"] if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            step = None
        if not isinstance(step, int):
            if i == len(lines) and not text.endswith("\n"):
                return records, f"{str(path)!r}: line {i}, the last, is torn ({line[:40]!r})"
            raise ValueError(f"{str(path)!r} line {i} is not a metrics record ({line[:60]!r}); "
                             f"delete the line, or start over with --overwrite")  # fmt: skip
        records.append(record)
    return records, None


def _read_run_meta(out: Path) -> dict:
    path = out / RUN_META
    try:
        meta = json.loads(path.read_text())
        config = meta["config"]
    except FileNotFoundError:
        raise ValueError(f"{str(out)!r} holds a checkpoint but no {RUN_META} (the run's config): restore it, "
                         f"or start over with --overwrite") from None  # fmt: skip
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a run record ({type(e).__name__}: {e}): restore it (it holds "
                         f"the run's config), or start over with --overwrite") from None  # fmt: skip
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} has no config object: restore it, or start over with --overwrite")
    return config


def _run_files(out: Path) -> list[str]:
    """The files of a previous run in ``out`` (what a fresh start would delete)."""
    names = (RUN_META, METRICS, CHECKPOINT, par.SHARDED_CHECKPOINT)
    return [n for n in names if (out / n).exists()]


def _comparable(cfg: TrainConfig) -> dict:
    """Config fields that must match for a resume (device, compile and data_dir do not change the math
    of a step on the same machine)."""
    d = asdict(cfg)
    for k in ("device", "compile", "data_dir", "parallel", "ckpt_every"):  # ckpt_every: only when it saves
        d.pop(k)
    if d["corpus"] == SHAKESPEARE:
        d.pop("corpus")  # runs recorded before the field existed trained on Shakespeare
    return d


class _RunLock:
    """``out/.lock`` holds the pid of the process training into ``out``; a second process (say two
    ``compare`` commands sharing an output folder) is refused instead of interleaving two runs' files."""

    def __init__(self, out: Path):
        self.path = out / LOCK

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = int(self.path.read_text() or 0)
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError, ValueError, OverflowError):
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                return self.__enter__()
            raise ValueError(f"run directory {str(self.path.parent)!r} is in use by process {pid}") from None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (Ctrl-C's SIGINT, or SIGTERM from ``kill``, a scheduler, a container
    stop). ``signum`` is the signal; a process should exit with ``128 + signum`` (130, 143)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


class _StopOnSignals:
    """SIGINT and SIGTERM while training (``loop=True``) set a flag the loop checks between steps, so the
    checkpoint is of a whole step; before the loop, or a second signal, interrupt at once. Either way the
    run's ``with`` blocks unwind, so ``.lock`` is removed."""

    def __init__(self):
        self.requested: int | None = None
        self.loop = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def _handle(self, signum, frame):
        if not self.loop or self.requested is not None:
            raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)
        self.requested = signum

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    position: int | None = None,
    callback: Callable[[int], None] | None = None,
) -> Path:
    """Train under ``cfg`` into ``out`` (``metrics.jsonl``, ``ckpt.pt``, ``run.json``); returns ``out``.

    ``resume=True`` continues from ``out/ckpt.pt`` when it exists (a finished run returns at once; a run
    without a checkpoint starts from step 0 and says so). A directory that holds a run is otherwise
    refused, unless ``overwrite=True`` deletes it. ``progress`` shows a tqdm bar (at terminal row
    ``position`` when several runs share a terminal). ``callback(step)`` runs after each completed step
    (tests use it to simulate Ctrl-C). Raises ``Interrupted`` (a ``KeyboardInterrupt``) on SIGINT or
    SIGTERM, after saving a checkpoint when the loop had started.
    """
    # -- validate everything before any work --------------------------------------------------------------
    if resume and overwrite:
        raise ValueError("resume and overwrite are exclusive: continue the run in out, or delete it")
    check_data_dir(cfg.data_dir)
    get_preset(cfg.preset)
    recipe = resolve_recipe(cfg.recipe, cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, got {device} (CUDA graphs record GPU kernels)")
    env, device = par.init(cfg.parallel, device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # cuda:k in a worker process: allocations and kernel launches go there
    if cfg.batch_size % env.world_size:
        raise ValueError(f"global batch_size={cfg.batch_size} does not split over {env.world_size} ranks")
    out = _writable_dir(Path(out))
    with _StopOnSignals() as stop, _RunLock(out) if env.is_main else nullcontext():  # every rank trains into out
        if env.is_main:
            _remove_stale_temps(out)
        previous = _run_files(out)
        if previous and not (resume or overwrite):
            raise ValueError(f"{str(out)!r} holds a previous run ({', '.join(previous)}): continue it with "
                             f"--resume, or delete it with --overwrite")  # fmt: skip
        if env.distributed:
            torch.distributed.barrier()  # every rank has looked before rank 0 writes run.json
        return _train(cfg, out, recipe, device, env, stop, resume=resume, progress=progress and env.is_main,
                      position=position, callback=callback)  # fmt: skip


def _train(cfg: TrainConfig, out: Path, recipe, device: torch.device, env: par.DistEnv, stop: _StopOnSignals, *,
           resume: bool, progress: bool, position: int | None, callback: Callable[[int], None] | None) -> Path:  # fmt: skip
    data = load_corpus(cfg.corpus, cfg.tokenizer, cfg.data_dir)
    model_cfg = get_preset(cfg.preset, vocab_size=data.vocab_size)
    T, B = model_cfg.block_size, cfg.batch_size

    # -- model, optimizer, data -----------------------------------------------------------------------------
    raw_model = build_model(model_cfg, recipe, device, seed=cfg.seed)
    wrapped = par.wrap(raw_model, env, device)  # DDP / FSDP2 (in place) / the model itself
    mode = compile_mode(cfg, device, env.world_size)
    if mode is not None:
        # a run starts from a clean compiler state: graphs of an earlier run in this process (fourbit compare,
        # a test session) left in the one CUDA-graph tree per device trip its pool-liveness check
        torch._dynamo.reset()
    model = torch.compile(wrapped, mode=mode) if mode is not None else wrapped
    opt = make_optimizer(raw_model, cfg, device)  # after FSDP2 has sharded the parameters
    sampler = BatchSampler(data.train, B // env.world_size, T, seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    xv, yv = val_windows(data.val, T, cfg.eval_tokens)
    fnn = _fnn() if recipe is not None else None
    tokens_per_step = B * T
    meta = {"config": asdict(cfg), "model": model_cfg.to_dict(), "recipe": recipe.to_dict() if recipe else None,
            "params": raw_model.num_params(non_embedding=False), "params_non_embedding": raw_model.num_params(),
            "tokens_per_step": tokens_per_step, "train_tokens": data.train.numel(), "val_tokens": data.val.numel(),
            "val_works": list(data.val_works), "device": str(device), "compile_mode": mode, "torch": torch.__version__,
            "world_size": env.world_size}  # fmt: skip

    # -- resume -------------------------------------------------------------------------------------------
    start, loss_sum, n_in_interval = 0, torch.zeros((), device=device), 0
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    # the newer of the single-process checkpoint and the sharded one (written by torchrun runs)
    plain = load_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None  # verified, on the CPU
    plain_step = int(plain["step"]) if plain is not None else None
    sharded_step = par.sharded_step(out) if resume else None
    use_sharded = sharded_step is not None and (plain_step is None or sharded_step >= plain_step)
    if env.mode is par.Parallel.FSDP2 and plain_step is not None and not use_sharded:
        raise ValueError(f"{str(out)!r} holds a single-process checkpoint; FSDP2 resumes sharded (ckpt_dcp) ones")
    if resume and (plain_step is not None or sharded_step is not None):
        old = _read_run_meta(out)
        diff = {k: (old.get(k), v) for k, v in _comparable(cfg).items() if old.get(k) != v}
        if diff:
            raise ValueError(f"cannot resume {str(out)!r} with a different config: {diff}")
        if use_sharded:
            ck = par.load_sharded(out, raw_model, opt)
        else:
            ck = plain
            raw_model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])  # moves the state onto the parameters' device
        start, n_in_interval = int(ck["step"]), int(ck["n_in_interval"])
        loss_sum = ck["loss_sum"].to(device)
        torch.set_rng_state(ck["torch_rng"].cpu())  # RNG states are CPU ByteTensors, whatever map_location did
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
        if fnn is not None and ck.get("fourbit_rng") is not None:
            fnn.load_rng_state(raw_model, ck["fourbit_rng"])
        records, torn = _read_metrics(metrics_path)
        kept = [m for m in records if m["step"] <= start]
        if env.is_main:
            if torn is not None or len(kept) < len(records):
                _notice(f"resuming at step {start}: {metrics_path} cut to the records up to it"
                        + (f" ({torn})" if torn else ""))  # fmt: skip
            _atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
        if start >= cfg.steps:
            return out
    else:
        if resume and env.is_main and _run_files(out):
            _notice(f"--resume: {str(out)!r} holds no checkpoint (the run stopped before its first one); "
                    f"starting from step 0")  # fmt: skip
        if env.is_main:
            (out / RUN_META).write_text(json.dumps(meta, indent=1) + "\n")
            metrics_path.write_text("")
            ckpt_path.unlink(missing_ok=True)
            shutil.rmtree(out / par.SHARDED_CHECKPOINT, ignore_errors=True)
        if env.distributed:
            torch.distributed.barrier()

    def save(step: int) -> None:
        state = {
            "step": step, "loss_sum": loss_sum.detach().cpu(), "n_in_interval": n_in_interval,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "fourbit_rng": fnn.rng_state(raw_model) if fnn is not None else None,
        }  # fmt: skip
        if env.distributed:
            par.save_sharded(out, raw_model, opt, state, env)
        else:
            ck = {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), **state}
            _atomic_save({**ck, CHECKSUMS: checksums(ck)}, ckpt_path)

    def log(record: dict) -> None:
        if not env.is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- the loop -------------------------------------------------------------------------------------------
    if start == 0:
        val = evaluate(model, xv, yv, 4 * B, device)
        log({"step": 0, "tokens": 0, "train_loss": None, "val_loss": val, "lr": 0.0, "grad_norm": None,
             "tokens_per_s": None, "elapsed_s": 0.0})  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.recipe} seed {cfg.seed}", unit="step",
                   dynamic_ncols=True, leave=True, position=position)  # fmt: skip
    t_interval, t_run = time.perf_counter(), time.perf_counter()
    steps_in_timing, gnorm = 0, None
    raw_model.train()
    step_fn = train_step
    if cfg.cuda_graph:  # after the resume: the device counters start from the restored SR steps
        from .graphs import GraphedTrainStep

        step_fn = GraphedTrainStep(raw_model, opt, device)
    stop.loop = True  # from here a signal stops at the next step boundary, with a checkpoint
    try:
        for step in range(start, cfg.steps):
            if fnn is not None:
                fnn.set_progress(raw_model, step / cfg.steps)
            x, y = sampler.batch(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, gnorm = step_fn(model, opt, x, y, lr_at(step, cfg), cfg.grad_clip, device)
            loss_sum += loss
            n_in_interval += 1
            steps_in_timing += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                train_loss = float(par.all_mean(loss_sum, env)) / n_in_interval  # the one host sync per interval
                now = time.perf_counter()
                rate = steps_in_timing * tokens_per_step / max(now - t_interval, 1e-9)  # excludes eval
                val = evaluate(model, xv, yv, 4 * B, device) if done % cfg.eval_every == 0 or done == cfg.steps else None
                log({"step": done, "tokens": done * tokens_per_step, "train_loss": train_loss, "val_loss": val,
                     "lr": lr_at(step, cfg), "grad_norm": _scalar(gnorm), "tokens_per_s": rate,
                     "elapsed_s": now - t_run})  # fmt: skip
                loss_sum, n_in_interval, steps_in_timing = torch.zeros((), device=device), 0, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}", **({"val": f"{val:.3f}"} if val is not None else {}))
            if bar is not None:
                bar.update(1)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                save(done)
            if steps_in_timing == 0:
                t_interval = time.perf_counter()  # the next interval's clock starts after eval and save
            if callback is not None:
                callback(done)
            if par.any_flag(stop.requested is not None, env, device):
                save(done)
                signum = stop.requested or signal.SIGINT  # another rank's signal: report it as Ctrl-C
                raise Interrupted(f"{signal.Signals(signum).name} after step {done}; checkpoint saved in {out}",
                                  signum)  # fmt: skip
    finally:
        stop.loop = False
        if bar is not None:
            bar.close()
    return out
