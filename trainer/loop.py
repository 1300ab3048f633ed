"""The training loop, top to bottom: set up, resume, train, checkpoint, evaluate."""

from __future__ import annotations

import logging
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CheckpointManager
from launcher import contract
from launcher.faults import FaultInjector, fail_at_start, faults_from_env, parse_fault
from launcher.worker import Reporter, StopRequest, init_process_group

from .config import ConfigError, TrainConfig
from .data import DataCursor, Split, load_dataset
from .model import CNN
from .observe import TrainingObserver
from .trace import NoTrace, SampleTrace

class Progress:
    """Optimizer steps and samples trained on so far (global, summed over ranks), and the
    schedule they belong to: resuming with another run length or LR would silently keep
    the checkpoint's LR schedule, so that is refused instead."""

    def __init__(self, total_steps: int, lr: float):
        self.step = 0
        self.samples_seen = 0
        self.total_steps = total_steps
        self.lr = lr

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "total_steps": self.total_steps, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        if state["total_steps"] != self.total_steps or state["lr"] != self.lr:
            raise ConfigError(
                f"the checkpoint belongs to a run of {state['total_steps']} steps at --lr {state['lr']}, this run "
                f"is {self.total_steps} steps at --lr {self.lr}; resume with the same --epochs/--max-steps/--lr "
                "or start a fresh --ckpt-dir")
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"[rank{rank}] %(name)s: %(message)s", force=True)
    for chatty in ("botocore", "aiobotocore", "s3fs"):  # "Found credentials in environment variables"...
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, batch: int = 1024) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(split), batch):
        logits = model(split.images[i:i + batch])
        correct += (logits.argmax(1) == split.labels[i:i + batch]).sum().item()
    model.train()
    return correct / len(split)


class LossLog:
    """The progress bar (a terminal) or a line every ``log_every`` steps (logs), rank 0 only."""

    def __init__(self, rank: int, total_steps: int, initial: int, log_every: int):
        self.rank, self.total_steps, self.log_every = rank, total_steps, log_every
        self.bar = tqdm(total=total_steps, initial=initial, disable=rank != 0 or not sys.stderr.isatty(),
                        unit="step", dynamic_ncols=True)
        self.loss, self.samples, self.since = 0.0, 0, time.monotonic()

    def update(self, step: int, epoch: int, loss_sum: float, samples: int) -> float:
        """Record one step; returns this rank's mean loss for it (rank 0's goes in the checkpoint)."""
        self.loss += loss_sum
        self.samples += samples
        self.bar.update(1)
        if step % self.log_every == 0 and self.rank == 0:
            rate = self.log_every / max(time.monotonic() - self.since, 1e-9)
            loss = self.loss / max(self.samples, 1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            if self.bar.disable:
                print(f"step {step}/{self.total_steps} epoch {epoch} loss {loss:.4f} ({rate:.1f} steps/s)", flush=True)
            self.loss, self.samples, self.since = 0.0, 0, time.monotonic()
        return round(loss_sum / max(samples, 1), 6)

    def close(self) -> None:
        self.bar.close()


def _faults(cfg: TrainConfig) -> list:
    try:
        return [parse_fault(spec) for spec in cfg.inject] + faults_from_env()
    except ValueError as e:
        raise ConfigError(f"--inject: {e}") from None


def train(cfg: TrainConfig) -> dict:
    faults = _faults(cfg)
    fail_at_start(faults, int(os.environ.get("LOCAL_RANK", 0)))  # a simulated broken device
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    env = init_process_group()
    rank, world = env.rank, env.world_size
    reporter = Reporter(env)  # heartbeats + events for ftlaunch's watchdog (no-op without it)
    reporter.event("worker_ready", world_size=world)  # process started, imports done, group formed
    stop = StopRequest(env)  # SIGTERM / ftlaunch's stop file -> all ranks stop after one step
    _setup_logging(rank)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    train_split, test_split = (s.to(device) for s in load_dataset(cfg))
    _seed_everything(cfg.seed)  # the same initial weights on every rank
    model = CNN(train_split.images.shape[-1], cfg.width).to(device)
    _seed_everything(cfg.seed * 1000 + rank)  # then a stream of its own per rank
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else model
    optimizer = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.9)
    cursor = DataCursor(len(train_split), cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * cursor.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    progress = Progress(total_steps, cfg.lr)
    injector = FaultInjector(faults, rank, os.path.join(cfg.run_dir, "faults"))
    ckpt = CheckpointManager(
        cfg.ckpt_dir, model=ddp, optimizer=optimizer, scheduler=scheduler,
        state={"progress": progress, "data": cursor}, config=cfg,
        observer=TrainingObserver(reporter, injector),
        metadata={"dataset": cfg.dataset, "width": cfg.width, "seed": cfg.seed},
        hmac_key=os.environ.get("FTLAUNCH_CKPT_KEY") or None,
        storage_options=cfg.storage_options_dict())  # keyed mode: signed records, SHA-256 files

    if ckpt.memory_dir:  # for ftlaunch: persisted and freed after the job (launcher.persist)
        reporter.node_event("memory_tier", memory_dir=ckpt.memory_dir)
    if os.environ.get(contract.PERSIST_ENV) == "1":  # ftlaunch: the job has ended for good
        _persist_memory(ckpt, reporter, rank)
        stop.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        return {"step": progress.step, "accuracy": None, "resumed_from": progress.step}
    resumed_from = _resume(ckpt, reporter, rank, world, cursor, total_steps)
    trace = SampleTrace(cfg.run_dir, rank, resumed_from) if cfg.trace_samples else NoTrace()
    losses = LossLog(rank, total_steps, progress.step, cfg.log_every)
    train_loss = float("nan")
    while progress.step < total_steps:
        # One optimizer step on the global batch, split across ranks.
        epoch = cursor.epoch
        idx, global_n = cursor.next_batch(rank, world)
        # Traced before the step: a rank killed after its gradients went into the all-reduce
        # still counts, as the survivors' step (and a memory snapshot of it) includes them; a
        # step that no rank finished is run again, and the later generation's trace wins.
        trace.record(progress.step + 1, epoch, idx)
        rows = idx.to(device)
        x, y = train_split.images[rows], train_split.labels[rows]
        optimizer.zero_grad(set_to_none=True)
        loss_sum = F.cross_entropy(ddp(x), y, reduction="sum")
        # DDP averages gradients over ranks; scaling by world/global_n makes the result the
        # mean over the global batch however it was split (a rank may even have 0 samples).
        (loss_sum * (world / global_n)).backward()
        optimizer.step()
        scheduler.step()
        progress.step += 1
        progress.samples_seen += global_n

        injector.after_step(progress.step)
        train_loss = losses.update(progress.step, cursor.epoch, loss_sum.item(), len(idx))
        reporter.beat(progress.step, ckpt.last_committed, ckpt.last_snapshot, ckpt.memory_on)
        if progress.step == resumed_from + 1:
            reporter.event("first_step", step=progress.step)
        if stop.agreed():  # preemption: every rank stops after this same step, saved
            _save_and_stop(ckpt, reporter, stop, rank, progress.step, train_loss)
            break
        if stop.pause_agreed:  # ftlaunch restarts the group for a node that joins: it resumes from this step
            reporter.event("paused", step=progress.step)
            ckpt.snapshot_now(progress.step)
            reporter.pause(ckpt.last_snapshot)
        if progress.step < total_steps:  # the last step's checkpoint comes after evaluation
            ckpt.maybe_save(progress.step, {"train_loss": train_loss})
    losses.close()

    stop.close()
    reporter.finish()
    accuracy = evaluate(model, test_split)
    if progress.step == total_steps:  # the final checkpoint is always committed
        ckpt.save(progress.step, {"test_accuracy": accuracy, "train_loss": train_loss}, wait=True)
        reporter.event("finished", step=progress.step, test_accuracy=accuracy)
    ckpt.close()  # a save still in flight (a stop before the last step) is committed before exit
    trace.close()
    if rank == 0 and progress.step == total_steps:
        print(f"finished at step {progress.step}, epoch {cursor.epoch}; samples seen {progress.samples_seen}; "
              f"final test accuracy {accuracy:.4f}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"step": progress.step, "accuracy": accuracy, "resumed_from": resumed_from}


def _resume(ckpt: CheckpointManager, reporter: Reporter, rank: int, world: int, cursor: DataCursor,
            total_steps: int) -> int:
    """Load the newest committed checkpoint, if any; returns the step it holds (0: none)."""
    started = time.monotonic()
    resumed = ckpt.load()
    step = resumed.step if resumed else 0
    reporter.event("resumed" if resumed else "fresh_start", step=step, world_size=world,
                   load_seconds=round(time.monotonic() - started, 4),
                   source=("memory" if ckpt.resumed_from_memory else "disk") if resumed else None)
    if rank == 0:
        if resumed:
            source = "memory snapshot" if ckpt.resumed_from_memory else "committed checkpoint"
            print(f"resumed from step {resumed.step} ({source}, saved at world size "
                  f"{resumed.world_size}; now {world}); epoch {cursor.epoch}, position {cursor.position}", flush=True)
        else:
            print(f"starting from scratch: {total_steps} steps, world size {world}", flush=True)
    return step


def _persist_memory(ckpt: CheckpointManager, reporter: Reporter, rank: int) -> None:
    """The generation ftlaunch starts after the last failure: resume from the memory tier and
    commit that step through the commit protocol, so a job that ended for good loses at most
    the steps since its newest snapshot. No training."""
    resumed = ckpt.load(memory_only=True)  # never the disk: nothing to persist from there
    newer = resumed is not None and resumed.step > (ckpt.last_committed or 0)
    if newer:
        ckpt.save(resumed.step, wait=True)
    reporter.event("persisted", step=resumed.step if newer else None)
    reporter.finish()
    ckpt.close()  # frees the shared memory
    if rank == 0:
        print(f"persisted the memory snapshot of step {resumed.step} as a durable checkpoint" if newer
              else "the memory tier holds nothing newer than the durable checkpoint", flush=True)


def _save_and_stop(ckpt: CheckpointManager, reporter: Reporter, stop: StopRequest, rank: int, step: int,
                   train_loss: float) -> None:
    """On a stop request: save this step and wait for its commit (never skipped)."""
    with reporter.phase(contract.STOPPING):
        ckpt.save(step, {"train_loss": train_loss}, wait=True)
    reporter.event("preempted", step=step, signal=stop.requested_by)
    if rank == 0:
        print(f"stopping at step {step} on request ({stop.requested_by}); "
              f"checkpoint committed, resume with the same command", flush=True)
