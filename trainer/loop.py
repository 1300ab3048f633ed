"""The training loop, top to bottom: set up, resume, train, checkpoint, evaluate."""

from __future__ import annotations

import json
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
from launcher.faults import FaultInjector, fail_at_start, faults_from_env, parse_fault
from launcher.worker import Reporter, StopRequest, init_process_group

from .config import ConfigError, TrainConfig
from .data import DataCursor, Split, load_dataset
from .model import CNN

log = logging.getLogger("trainer")


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


def save(ckpt: CheckpointManager, reporter: Reporter, step: int, metrics: dict, io_phase: str = "saving",
         wait: bool = False) -> None:
    """Save ``step`` (committed in the background when async; ``wait`` for the commit), with
    the events ftlaunch's run log shows.

    All of it runs in ``io_phase``, so ftlaunch's watchdog gives it --io-timeout, not the step
    limit: rank 0's preparation (re-verifying a committed step, deleting what a failed save
    left), the first async staging (allocating a buffer for the whole state) and waiting for
    the previous save are all checkpoint I/O."""
    reporter.event("save_begin", step=step)
    with reporter.phase(io_phase):
        if ckpt.async_mode == "off":
            ckpt.save(step, metrics)
        else:
            skip_if_busy = ckpt.if_busy == "skip" and not wait  # the last save, or one on preemption, must happen
            ckpt.save(step, metrics, skip_if_busy=skip_if_busy)
            if ckpt.last_staged_step == step:  # not skipped, not committed already
                reporter.event("save_staged", step=step, stall_seconds=round(ckpt.last_stall_seconds, 4))
        if wait:
            ckpt.wait()


def commit_event(reporter: Reporter):
    def on_commit(manifest) -> None:  # in the background thread for async saves
        reporter.event("save_commit", step=manifest.step, seconds=manifest.save_seconds,
                       bytes=sum(f.size for f in manifest.files.values()))
    return on_commit


def train(cfg: TrainConfig) -> dict:
    try:
        faults = [parse_fault(spec) for spec in cfg.inject] + faults_from_env()
    except ValueError as e:
        raise ConfigError(f"--inject: {e}") from None
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
        state={"progress": progress, "data": cursor},
        save_every_steps=cfg.save_every_steps, save_every_seconds=cfg.save_every_seconds,
        keep_last=cfg.keep_last, verify=cfg.verify,
        metadata={"dataset": cfg.dataset, "width": cfg.width, "seed": cfg.seed},
        before_commit=injector.before_commit, before_load=injector.before_load,
        on_commit=commit_event(reporter), async_mode=cfg.async_save, if_busy=cfg.if_busy,
        io_threads=cfg.io_threads, allow_fresh_start=cfg.allow_fresh_start,
        hmac_key=os.environ.get("FTLAUNCH_CKPT_KEY") or None)  # keyed mode: signed records, SHA-256 files
    load_started = time.monotonic()
    with reporter.phase("loading"):
        resumed = ckpt.load()
    resumed_from = resumed.step if resumed else 0
    reporter.event("resumed" if resumed else "fresh_start", step=resumed_from, world_size=world,
                   load_seconds=round(time.monotonic() - load_started, 4))
    if rank == 0:
        if resumed:
            print(f"resumed from step {resumed.step} (committed checkpoint, saved at world size "
                  f"{resumed.world_size}; now {world}); epoch {cursor.epoch}, position {cursor.position}", flush=True)
        else:
            print(f"starting from scratch: {total_steps} steps, world size {world}", flush=True)

    trace = None
    if cfg.trace_samples:
        os.makedirs(os.path.join(cfg.run_dir, "samples"), exist_ok=True)
        trace = open(os.path.join(cfg.run_dir, "samples", f"rank{rank}.jsonl"), "a")
        # One token per generation (rank 0's clock, shared): a later generation that redoes
        # steps lost to a failure has a larger token, whatever its restart count says.
        launch = [time.time()]
        if dist.is_initialized():
            dist.broadcast_object_list(launch, src=0)

    bar = tqdm(total=total_steps, initial=progress.step, disable=rank != 0 or not sys.stderr.isatty(),
               unit="step", dynamic_ncols=True)
    window_loss, window_n, window_start = 0.0, 0, time.monotonic()
    train_loss = float("nan")
    while progress.step < total_steps:
        epoch = cursor.epoch
        idx, global_n = cursor.next_batch(rank, world)
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
        if trace is not None:
            trace.write(json.dumps({"step": progress.step, "epoch": epoch, "launch": launch[0],
                                    "resumed_from": resumed_from, "idx": idx.tolist()}) + "\n")
            trace.flush()
        injector.after_step(progress.step)

        local_loss = loss_sum.item()
        window_loss += local_loss
        window_n += len(idx)
        bar.update(1)
        if progress.step % cfg.log_every == 0 and rank == 0:
            rate = cfg.log_every / max(time.monotonic() - window_start, 1e-9)
            loss = window_loss / max(window_n, 1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if bar.disable:
                print(f"step {progress.step}/{total_steps} epoch {cursor.epoch} loss {loss:.4f} "
                      f"({rate:.1f} steps/s)", flush=True)
            window_loss, window_n, window_start = 0.0, 0, time.monotonic()
        train_loss = round(local_loss / max(len(idx), 1), 6)  # rank 0's share of the batch
        reporter.beat(progress.step, ckpt.last_committed)
        if progress.step == resumed_from + 1:
            reporter.event("first_step", step=progress.step)
        if stop.agreed():  # preemption: every rank stops after this same step, saved
            save(ckpt, reporter, progress.step, {"train_loss": train_loss}, io_phase="stopping", wait=True)
            reporter.event("preempted", step=progress.step, signal=stop.requested_by)
            if rank == 0:
                print(f"stopping at step {progress.step} on request ({stop.requested_by}); "
                      f"checkpoint committed, resume with the same command", flush=True)
            break
        if progress.step < total_steps and ckpt.should_save(progress.step):  # the last step: below
            kill_now = injector.before_save(progress.step)
            save(ckpt, reporter, progress.step, {"train_loss": train_loss})
            kill_now()
    bar.close()

    stop.close()
    reporter.finish()
    accuracy = evaluate(model, test_split)
    if progress.step == total_steps:  # the final checkpoint is always committed
        save(ckpt, reporter, progress.step, {"test_accuracy": accuracy, "train_loss": train_loss}, wait=True)
        reporter.event("finished", step=progress.step, test_accuracy=accuracy)
    ckpt.close()  # a save still in flight (a stop before the last step) is committed before exit
    if trace is not None:
        trace.close()
    if rank == 0 and progress.step == total_steps:
        print(f"finished at step {progress.step}, epoch {cursor.epoch}; samples seen {progress.samples_seen}; "
              f"final test accuracy {accuracy:.4f}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"step": progress.step, "accuracy": accuracy, "resumed_from": resumed_from}
