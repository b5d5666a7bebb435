"""The training loop: data, steps, validation, samples, logs and checkpoints of one run.

A run lives in one folder: ``tokenizer.json``, ``data/`` (the token file), ``metrics.jsonl``,
``metrics.csv``, ``loss.png`` and ``checkpoints/``. Resuming reloads the latest checkpoint's
weights, optimizer state, counters, data-sampler state and settings, so the losses after it
are bit for bit those of a run that never stopped. A LoRA run's checkpoints hold the adapter as
a PEFT folder stamped with its base's fingerprint (formats/peft.py), not a model folder.
"""

from __future__ import annotations

import contextlib
import json
import resource
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from tokenizers import Tokenizer
from tqdm import tqdm

from einplan.apps.data import BatchSampler, TokenSplits, tokenize_corpus, validation_windows
from einplan.apps.metrics import MetricsLog
from einplan.apps.session import plan_config
from einplan.compiler.lora_spec import parse_lora
from einplan.compiler.passes.autodiff import trainable
from einplan.compiler.passes.memory import estimate_memory
from einplan.compiler.plan import Plan, hash_config
from einplan.errors import EinplanError
from einplan.formats.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    verified_weights,
)
from einplan.formats.files import write_atomic
from einplan.formats.peft import (
    BASE_STAMP,
    CONFIG_FILE,
    PEFT_PREFIX,
    TENSORS_FILE,
    base_fingerprint,
    init_lora,
    peft_config,
)
from einplan.formats.tokenizer import (
    byte_tokenizer,
    hf_tokenizer_config,
    load_tokenizer,
    train_tokenizer,
)
from einplan.formats.weights import (
    load_weights,
    random_weights,
    resolve_weights_dir,
    safetensors_metadata,
)
from einplan.models.config import to_hf_config, to_hf_generation_config
from einplan.models.train_config import TrainConfig, parse_train_config
from einplan.report.training import (
    plot_loss_curve,
    print_activation_memory,
    print_training_summary,
)
from einplan.runtime.backends import get_backend
from einplan.runtime.generate import GenerationRequest, Generator
from einplan.runtime.moe import router_entropy
from einplan.runtime.sampling import SamplingConfig
from einplan.runtime.trainer import Shard, StepStats, Trainer

# what a run that has trained leaves in its folder: a fresh run over it would orphan the
# checkpoints and overwrite the log
RUN_HISTORY = ("checkpoints", "metrics.jsonl", "metrics.csv", "loss.png")
SAMPLING = SamplingConfig(temperature=0.8, top_k=40, seed=0)
# settings baked into the plan's update steps and dtypes
COMPILED = (
    "optimizer",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "decay_norms_and_biases",
    "momentum",
    "grad_clip",
    "compute_dtype",
    "checkpoint",
)


@dataclass
class RunOptions:
    """What the command line asks of one run."""

    corpus: Path
    out: Path
    steps: int | None = None  # stop after this step (default: the settings' steps)
    resume: bool = False
    init_weights: str | None = None
    tokenizer: str | None = None  # overrides the settings' tokenizer
    overrides: dict[str, Any] | None = None  # train settings changed for this run
    workers: int = 0
    kernels: str | None = None  # kernels backend (None: the fastest installed)
    device: str | None = None  # cpu (None) or cuda (runtime/cuda)
    cuda_graph: bool = True  # cuda: replay each step as one CUDA graph
    tf32: bool = False  # cuda: float32 products on TF32 tensor cores


def peak_rss_mib() -> float:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tokenizer(spec: str, corpus: Path, vocab: int, out: Path) -> Tokenizer:
    """The run's tokenizer: ``bytes``, ``train`` (BPE learned on the corpus), or a file; saved
    beside the run so that resuming and checkpoints use the very same one."""
    saved = out / "tokenizer.json"
    if spec == "bytes":
        tok = byte_tokenizer()
    elif spec == "train":
        if not corpus.is_file():
            raise EinplanError(f"corpus {str(corpus)!r} not found (give a text file with --data)")
        tok = train_tokenizer(corpus, vocab)
    elif spec:
        tok = load_tokenizer(spec)
    else:
        raise EinplanError(
            "no tokenizer: give --tokenizer PATH (a tokenizer.json), 'bytes' or 'train' "
            "(a BPE learned on the corpus), or set the train section's tokenizer"
        )
    if tok.get_vocab_size() > vocab:
        raise EinplanError(
            f"tokenizer has {tok.get_vocab_size()} ids but the model's vocabulary is {vocab}"
        )
    write_atomic(saved, tok.save)
    return tok


def initial_weights(plan: Plan, options: RunOptions, seed: int) -> dict[str, np.ndarray]:
    """Starting weights, writable where trained: a pretrained checkpoint, or seeded random
    ones; LoRA's A and B fresh (B zero) on a pretrained base, which stays read-only."""
    graph = plan.entry("train_step")
    if options.init_weights:
        tied = plan.config["tie_word_embeddings"]
        source = verified_weights(resolve_weights_dir(options.init_weights))
        loaded = load_weights(graph, source, tied=tied)
    elif plan.meta.get("lora"):
        raise EinplanError(
            "LoRA trains adapters on a pretrained base: give its weights with --init-weights "
            "(also when resuming)"
        )
    else:
        loaded = random_weights(graph, seed)
    trained = {n.attrs["key"] for n in graph.params() if trainable(n)}
    weights = {k: np.array(v) if k in trained else v for k, v in loaded.items()}
    return {**weights, **init_lora(graph, seed)}


def checkpoint_weights(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The trained weights a checkpoint holds: ``model.safetensors``, or a LoRA run's adapter
    under the plan's keys."""
    if TENSORS_FILE in ckpt.state["files"]:
        return {k.removeprefix(PEFT_PREFIX): a for k, a in ckpt.tensors(TENSORS_FILE).items()}
    return ckpt.tensors("model.safetensors")


def escape_control(text: str) -> str:
    """``text`` safe to print: control characters (escape sequences, carriage returns) as
    their ``repr`` escapes, newlines and tabs kept."""
    return "".join(
        c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text
    )


def sample_text(plan: Plan, weights: dict, tok: Tokenizer, prompt: str, tokens: int) -> str:
    """The prompt and a sampled continuation from the current weights."""
    ids = tok.encode(prompt).ids
    request = GenerationRequest([ids], tokens, SAMPLING)
    gen = Generator(plan, weights).generate(request, decode_text=tok.decode)
    return prompt + gen.texts[0]


class Progress:
    """A run's progress bar and the lines printed above it (tqdm on this terminal)."""

    def __init__(self, total: int, initial: int) -> None:
        self.total, self.initial = total, initial

    @contextlib.contextmanager
    def shown(self) -> Iterator[Progress]:
        """Show the bar while the run trains."""
        with tqdm(total=self.total, initial=self.initial, unit="step", desc="train") as bar:
            self.bar = bar
            yield self

    def step(
        self, loss: float, lr: float, tokens_per_s: float, loss_scale: float | None = None
    ) -> None:
        """Advance the bar by one step and show its loss, learning rate and tokens/s (and an
        f16 run's loss scale)."""
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{loss:.3f}",
            lr=f"{lr:.2e}",
            tok_s=f"{tokens_per_s:,.0f}",
            **({} if loss_scale is None else {"scale": f"{loss_scale:g}"}),
        )

    def write(self, text: str) -> None:
        """Print a line above the bar."""
        tqdm.write(text)


def finish_run(records: list[dict[str, Any]], out: Path, console: Console) -> None:
    """Print a run's summary table and write its loss curve."""
    if not records:
        return
    print_training_summary(records, console)
    try:
        plot_loss_curve(records, out / "loss.png")
        console.print(f"wrote {out / 'loss.png'}")
    except EinplanError as e:
        console.print(f"loss curve not drawn: {e}", markup=False)


class TrainingRun:
    """One run folder: its settings, data, trainer, log and checkpoints."""

    def __init__(
        self,
        plan: Plan,
        options: RunOptions,
        console: Console | None = None,
        shard: Shard | None = None,
    ) -> None:
        """Prepare a fresh run, or (``options.resume``) reload the latest checkpoint.
        ``shard``: this process is one of a data-parallel group (apps/distributed.py); only
        its rank 0 writes the log, samples and checkpoints."""
        if "train_step" not in plan.entries:
            raise EinplanError("plan has no train_step entry: compile it with --train")
        self.plan, self.options, self.console = plan, options, console or Console()
        self.shard = shard
        self.lead = shard is None or shard.rank == 0  # writes the run's files
        self.config = plan_config(plan)  # checked, as for every plan a run binds
        out = options.out
        self.ckpt_root = out / "checkpoints"
        ckpt = load_checkpoint(self.ckpt_root) if options.resume else None
        if ckpt is not None:
            if options.overrides or options.tokenizer:
                raise EinplanError("a resumed run keeps its checkpoint's settings and tokenizer")
            cfg = parse_train_config(ckpt.state["train"], str(ckpt.path))
            if ckpt.state["model_config_hash"] != hash_config(plan.config):
                raise CheckpointError(f"{ckpt.path}: checkpoint is of another model than the plan")
            self.tokenizer = load_tokenizer(str(out / "tokenizer.json"))
        else:
            raw = {**plan.meta["train"], **(options.overrides or {})}
            cfg = parse_train_config(raw, "train settings")
            spec = options.tokenizer or cfg.tokenizer
            self.tokenizer = run_tokenizer(spec, options.corpus, plan.config["vocab_size"], out)
        compiled = {**TrainConfig().to_dict(), **plan.meta["train"]}  # older plans lack new keys
        changed = [k for k in COMPILED if compiled[k] != getattr(cfg, k)]
        if changed:
            raise EinplanError(
                f"train settings {', '.join(changed)} are compiled into the plan; recompile it "
                "(einplan compile --train) to change them"
            )
        self.cfg = cfg
        ids, key = tokenize_corpus(options.corpus, self.tokenizer, out / "data")
        self.splits = TokenSplits.split(ids, key, cfg.val_fraction, cfg.seq_len)
        self.sampler = BatchSampler(self.splits.train, cfg.seq_len, cfg.seed)
        val = validation_windows(self.splits.val, cfg.seq_len, cfg.eval_batches * cfg.micro_batch)
        self.val_batches = [
            np.stack(val[i : i + cfg.micro_batch]) for i in range(0, len(val), cfg.micro_batch)
        ]
        self.trainer = Trainer(
            plan,
            initial_weights(plan, options, cfg.seed),
            cfg,
            options.workers,
            get_backend(options.kernels, options.device, options.cuda_graph, options.tf32),
        )
        lora = plan.meta.get("lora")
        self.base_stamp = base_fingerprint(self.trainer.host_weights()) if lora else ""
        if ckpt is not None:
            self.check_base(ckpt)
            if ckpt.state["data"]["key"] != key:
                raise CheckpointError(
                    f"{ckpt.path}: the corpus or tokenizer differs from the checkpointed run's"
                )
            self.trainer.restore(
                checkpoint_weights(ckpt),
                ckpt.tensors("optimizer.safetensors"),
                ckpt.state["counters"],
            )
            self.sampler.restore(ckpt.state["sampler"])
        resume_step = self.trainer.step if ckpt is not None else None
        self.metrics = MetricsLog(out, resume_step) if self.lead else None
        self.last_checkpoint: Path | None = ckpt.path if ckpt is not None else None

    def check_base(self, ckpt: Checkpoint) -> None:
        """Refuse to resume a LoRA run on other base weights than it was trained on."""
        if not self.base_stamp:
            return
        stamp = safetensors_metadata(ckpt.path / TENSORS_FILE).get(BASE_STAMP)
        if stamp != self.base_stamp:
            raise CheckpointError(
                f"{ckpt.path}: the LoRA adapter was trained on other base weights than "
                f"{self.options.init_weights}; give the run's own --init-weights"
            )

    def checkpoint(self) -> Path:
        """Save the run's state after the current step."""
        t = self.trainer
        cfg = self.config
        tk_cfg = hf_tokenizer_config(
            self.tokenizer, cfg.bos_token_id, cfg.eos_token_id, cfg.max_position_embeddings
        )
        files = {
            "tokenizer.json": self.tokenizer.to_str(),
            "tokenizer_config.json": json.dumps(tk_cfg, indent=1),
        }
        state = {
            "counters": t.counters(),
            "sampler": self.sampler.state(),
            "train": self.cfg.to_dict(),
            "data": {"key": self.splits.key, "corpus": str(self.options.corpus)},
            "model_config_hash": hash_config(self.plan.config),
        }
        trained = t.trained_weights()
        tensors = {"optimizer.safetensors": t.optimizer_state()}
        metadata = {}
        if self.base_stamp:  # a PEFT adapter folder (einplan lora merge, --adapter, PEFT)
            lora = parse_lora(self.plan.meta["lora"])
            base = str(self.options.init_weights or "")
            files[CONFIG_FILE] = json.dumps(peft_config(lora, base), indent=1)
            tensors[TENSORS_FILE] = {PEFT_PREFIX + k: v for k, v in trained.items()}
            metadata[TENSORS_FILE] = {BASE_STAMP: self.base_stamp}
        else:  # a model folder (transformers, einplan --weights)
            files["config.json"] = json.dumps(to_hf_config(cfg), indent=1)
            files["generation_config.json"] = json.dumps(to_hf_generation_config(cfg), indent=1)
            tensors["model.safetensors"] = trained
        encoded = {k: v.encode() for k, v in files.items()}
        self.last_checkpoint = save_checkpoint(
            self.ckpt_root, t.step, tensors, encoded, state, self.cfg.keep_checkpoints, metadata
        )
        return self.last_checkpoint

    def record(self, stats: StepStats, step_losses: list[float]) -> dict[str, Any]:
        """A log record for a step, with the validation loss of the current weights, the loss
        of every step since the previous record (``step_losses``, ending at this one) and, for
        a mixture of experts, the routers' entropy on the step's last batch."""
        entropy = router_entropy() if self.plan.config.get("num_experts") else None
        return {
            "step": stats.step,
            "loss": stats.loss,
            "step_losses": step_losses,
            "val_loss": self.trainer.validation_loss(self.val_batches),
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_s": stats.tokens / stats.seconds,
            "forward_ms": stats.phase_ms["forward"],
            "backward_ms": stats.phase_ms["backward"],
            "optimizer_ms": stats.phase_ms["optimizer"],
            "peak_rss_mib": peak_rss_mib(),
            "skipped": self.trainer.skipped,
            **({} if entropy is None else {"router_entropy": entropy}),
            **({} if stats.loss_scale is None else {"loss_scale": stats.loss_scale}),
            **({} if self.shard is None else shard_metrics(stats)),
        }

    def draw_batches(self) -> list[np.ndarray]:
        """The micro-batches of the next step: all of them, or this shard's share (every
        shard draws the whole step, so the sampler's state is the single process's)."""
        c, shard = self.cfg, self.shard
        size = shard.size if shard else 1
        batches = [self.sampler.draw(c.micro_batch) for _ in range(c.accumulation * size)]
        return batches[shard.rank :: size] if shard else batches

    def run(self, steps: int | None = None, progress: Progress | None = None) -> list[StepStats]:
        """Train up to step ``steps``, logging, sampling and checkpointing on the way;
        ``progress``: where the bar and log lines go (default: this terminal)."""
        c, t = self.cfg, self.trainer
        last = steps or self.options.steps or c.steps
        done: list[StepStats] = []
        step_losses: list[float] = []  # every step's loss since the last record
        progress = progress or Progress(last, t.step)
        with progress.shown() if self.lead else contextlib.nullcontext() as bar:
            while t.step < last:
                stats = t.run_step(self.draw_batches(), self.shard)
                done.append(stats)
                step_losses.append(stats.loss)
                if not self.lead:
                    continue
                bar.step(stats.loss, stats.lr, stats.tokens / stats.seconds, stats.loss_scale)
                at = stats.step
                if stats.skipped:
                    bar.write(
                        f"step {at}: loss {stats.loss}, gradient norm {stats.grad_norm}: not "
                        f"finite, update skipped ({t.skipped} so far)"
                        + (f"; loss scale now {t.loss_scale.scale:g}" if t.loss_scale else "")
                    )
                if (c.log_every and at % c.log_every == 0) or at == last or stats.skipped:
                    r = self.record(stats, step_losses)
                    step_losses = []
                    self.metrics.log(r)
                    bar.write(record_line(r))
                if c.sample_every and at % c.sample_every == 0:
                    text = sample_text(
                        self.plan,
                        t.host_weights(),
                        self.tokenizer,
                        c.sample_prompt,
                        c.sample_tokens,
                    )
                    bar.write(f"--- sample at step {at} ---\n{escape_control(text)}\n---")
                if (c.checkpoint_every and at % c.checkpoint_every == 0) or at == last:
                    self.checkpoint()
        return done

    def finish(self) -> None:
        """Print the summary table and write the loss curve."""
        if not self.metrics.records:
            return
        finish_run(self.metrics.records, self.options.out, self.console)
        dims = {"batch": self.cfg.micro_batch, "seq": self.cfg.seq_len}
        est = estimate_memory(self.plan.entry("train_step"), dims)
        print_activation_memory(
            self.cfg.checkpoint,
            est["arena_bytes"] + est["scratch_bytes"],  # what the runtime's arena holds
            self.trainer.executor.activation_bytes(),
            peak_rss_mib(),
            self.console,
        )


def shard_metrics(stats: StepStats) -> dict[str, Any]:
    """A data-parallel step's extra log fields: the all-reduce's milliseconds and share of
    the step, and each worker's tokens/s."""
    return {
        "allreduce_ms": stats.allreduce_ms,
        "allreduce_fraction": stats.allreduce_ms / (stats.seconds * 1e3),
        "workers": stats.workers,
    }


def record_line(r: dict[str, Any]) -> str:
    """The line a log record prints above the progress bar."""
    line = (
        f"step {r['step']}  loss {r['loss']:.4f}  val {r['val_loss']:.4f}  "
        f"lr {r['lr']:.2e}  norm {r['grad_norm']:.3f}  "
        f"{r['tokens_per_s']:,.0f} tok/s  fwd {r['forward_ms']:.0f} "
        f"bwd {r['backward_ms']:.0f} opt {r['optimizer_ms']:.0f} ms  "
        f"peak {r['peak_rss_mib']:,.0f} MiB  skipped {r['skipped']}"
    )
    if "router_entropy" in r:
        line += f"  router entropy {r['router_entropy']:.3f}"
    if "loss_scale" in r:
        line += f"  loss scale {r['loss_scale']:g}"
    if "allreduce_ms" in r:
        per_worker = " ".join(f"{w['tokens_per_s']:,.0f}" for w in r["workers"])
        line += (
            f"  all-reduce {r['allreduce_ms']:.0f} ms ({r['allreduce_fraction']:.0%})"
            f"  worker tok/s {per_worker}"
        )
    return line
