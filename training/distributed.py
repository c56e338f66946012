"""Data-parallel training across processes (torchrun / ``ism-edge train --nproc N``).

Every helper here is the identity, or a plain single-process computation, when no process group
of more than one rank is initialised: single-process training takes exactly the code paths it
took before this module existed. Under torchrun (``WORLD_SIZE`` > 1 in the environment)
:func:`process_group` joins the group (gloo on CPU, NCCL on CUDA) with a collective timeout, so
that a rank that died or hangs ends the job with one error line instead of a silent wait.

The scheme, for the recipe (``ism_edge_training.recipe``):

* **data**: every epoch all ranks draw the same permutation of the training images (the
  single-process seed), pad it to a multiple of the world size with its first indices (as
  :class:`torch.utils.data.DistributedSampler` does) and rank r takes every world-size-th index
  from position r (:func:`shard`); ``--batch-size`` stays the *global* batch, each rank runs
  ``batch_size / world_size`` of it, so learning rates and schedules mean the same at any size;
* **gradients**: the trained network of each stage is wrapped in
  :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`data_parallel`); attacks are crafted
  on the bare network (input gradients only, on the rank's own shard);
* **BatchNorm** (classifier C only): per-rank batch statistics; DDP broadcasts rank 0's running
  statistics before every forward and :func:`broadcast_buffers` after every epoch, so all ranks
  evaluate and save the same running statistics (SyncBatchNorm needs CUDA; not used);
* **held-out evaluation and calibration**: sharded contiguously (:func:`local_part`), counts summed
  (:func:`sum_all`) and per-image scores gathered in rank order (:func:`gather_arrays`): the same
  figures as one process;
* **files and logs**: only rank 0 writes bundles, checkpoints and log lines; the others wait at
  a :func:`barrier`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import nn

from ism_edge.errors import IsmEdgeError

# Seconds a collective waits for the other ranks before the job fails; a save, one epoch's
# slowest rank or a held-out evaluation must fit (see --dist-timeout).
DEFAULT_TIMEOUT_S = 900.0
# Offset between the seeds of consecutive ranks (rank 0 keeps the --seed stream of one process).
RANK_SEED_STRIDE = 1_000_003


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0, or the only process)."""
    return rank() == 0


def rank_seed(seed: int) -> int:
    """This rank's seed for its own random draws (attacks, augmentation): ``seed`` on rank 0."""
    return seed + RANK_SEED_STRIDE * rank()


def launched_ranks() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(value)
    except ValueError:
        raise IsmEdgeError(f"WORLD_SIZE={value!r} in the environment is not a whole number") from None
    if n < 1:
        raise IsmEdgeError(f"WORLD_SIZE={n} in the environment must be >= 1")
    return n


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise IsmEdgeError(f"WORLD_SIZE is set but {name} is not: launch with torchrun (or ism-edge train --nproc N)")
    try:
        return int(value)
    except ValueError:
        raise IsmEdgeError(f"{name}={value!r} in the environment is not a whole number") from None


@contextlib.contextmanager
def process_group(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[torch.device | None]:
    """Join torchrun's process group for the block when ``WORLD_SIZE`` > 1, else do nothing.

    Yields the device this rank trains on (``cuda:LOCAL_RANK`` for ``cuda``/``auto`` with a GPU,
    else the CPU), or None outside torchrun (the caller's ``--device`` applies unchanged). The
    backend is NCCL for CUDA and gloo for the CPU; every collective gives up after ``timeout_s``.
    """
    if launched_ranks() <= 1:
        yield None
        return
    if not torch.distributed.is_available():
        raise IsmEdgeError("this PyTorch build has no torch.distributed: train with one process")
    local_rank = _env_int("LOCAL_RANK")
    _env_int("RANK")
    if device.startswith("cuda:"):
        raise IsmEdgeError(f"--device {device}: with several ranks each takes the GPU of its local rank; "
                           "choose the GPUs with CUDA_VISIBLE_DEVICES and pass --device cuda")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise IsmEdgeError(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise IsmEdgeError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible, "
                               "start at most that many processes per node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device not in ("cpu", "auto"):
        raise IsmEdgeError(f"--device {device!r} is not cpu, cuda or auto")
    else:
        dev = torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    try:
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                             device_id=dev if dev.type == "cuda" else None)
    except (RuntimeError, ValueError) as e:
        raise IsmEdgeError(f"cannot join the process group ({backend}): {_first_line(e)}") from None
    try:
        yield dev
    finally:
        with contextlib.suppress(Exception):  # a failed peer may leave the group unusable: still exit cleanly
            torch.distributed.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def lost_peer(e: BaseException) -> IsmEdgeError:
    """The one-line error for a collective that failed: another rank died, or it timed out."""
    detail = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(e)).split(". ")[0][:160]  # no "[file.cc:537]" prefix
    return IsmEdgeError(f"rank {rank()}: lost the other ranks ({detail}): another rank failed or stalled "
                        "past --dist-timeout, see its error line")


def barrier() -> None:
    """Wait for every rank (no-op in one process): the ranks that do not write wait for rank 0."""
    if active():
        torch.distributed.barrier()


def shard(order: np.ndarray, *, of: tuple[int, int] | None = None) -> np.ndarray:
    """This rank's part of ``order`` (DistributedSampler's rule): pad to a multiple of the world
    size with the first indices, take every world-size-th from position ``rank``. All ranks get
    the same count, so they run the same number of batches (DDP needs that). ``of=(rank, world)``
    names another rank's part."""
    r, w = of if of is not None else (rank(), world_size())
    if w == 1:
        return order
    total = -(-len(order) // w) * w
    padded = np.concatenate([order, order[: total - len(order)]]) if total > len(order) else order
    return padded[r:total:w]


def local_batch(batch_size: int) -> int:
    """This rank's part of the global ``batch_size``."""
    return batch_size // world_size()


def local_part(n: int, *, of: tuple[int, int] | None = None) -> np.ndarray:
    """Contiguous, unpadded index range of ``n`` items for this rank (held-out evaluation: every
    image counted once; concatenating the ranks' parts in rank order gives ``range(n)``)."""
    r, w = of if of is not None else (rank(), world_size())
    bounds = np.linspace(0, n, w + 1).round().astype(np.int64)
    return np.arange(bounds[r], bounds[r + 1])


def sum_all(*values: float) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (the values themselves in one process)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    try:
        torch.distributed.all_reduce(t)
    except RuntimeError as e:
        raise lost_peer(e) from None
    return t.tolist()


def average_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """An epoch's metrics over all ranks: means of the means (every rank trains on as many images,
    see :func:`shard`), the sum of the ranks' ``img_s`` (the job's throughput)."""
    if not active():
        return metrics
    keys = list(metrics)  # every rank's epoch function returns the same keys in the same order
    sums = sum_all(*(metrics[k] for k in keys))
    return {k: s if k == "img_s" else s / world_size() for k, s in zip(keys, sums, strict=True)}


def gather_arrays(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every rank's arrays in rank order (per-image scores of a :func:`local_part`)."""
    if not active():
        return parts
    out: list[Any] = [None] * world_size()
    try:
        torch.distributed.all_gather_object(out, parts)
    except RuntimeError as e:
        raise lost_peer(e) from None
    return {k: np.concatenate([p[k] for p in out]) for k in parts}


def broadcast_buffers(nets: Sequence[nn.Module]) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) of ``nets``."""
    if not active():
        return
    try:
        for net in nets:
            for buf in net.buffers():
                torch.distributed.broadcast(buf.data, src=0)
    except RuntimeError as e:
        raise lost_peer(e) from None


def broadcast_state(nets: Sequence[nn.Module]) -> None:
    """Give every rank rank 0's parameters and buffers of ``nets`` (after loading or resuming)."""
    if not active():
        return
    try:
        for net in nets:
            for t in net.state_dict().values():
                torch.distributed.broadcast(t.data, src=0)
    except RuntimeError as e:
        raise lost_peer(e) from None


class _Dispatch(nn.Module):
    """Routes a named method through ``forward``, so that DDP prepares its gradient all-reduce for it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args: Any, _method: str = "forward", **kwargs: Any) -> Any:
        return getattr(self.net, _method)(*args, **kwargs)


class DataParallelNet(nn.parallel.DistributedDataParallel):
    """DDP over a network, with ``forward_with_code`` (the mapping network's) through DDP too."""

    def forward_with_code(self, x: torch.Tensor) -> Any:
        return self(x, _method="forward_with_code")


def data_parallel(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` wrapped for data-parallel training (its gradients averaged over the ranks), or
    ``net`` itself in one process. The wrapper shares ``net``'s parameters: optimisers, saving and
    evaluation keep using ``net``; only the training forward/backward passes go through the wrapper.
    Construction broadcasts rank 0's weights, so every rank starts the stage alike."""
    if not active():
        return net
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    try:
        return DataParallelNet(_Dispatch(net), device_ids=ids)  # buffers: rank 0's before every forward
    except RuntimeError as e:
        raise lost_peer(e) from None


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of one epoch over ``n`` images at the global ``batch_size`` (this rank's count)."""
    if not active():
        return -(-n // batch_size)
    return -(-len(shard(np.arange(n))) // local_batch(batch_size))


# What the backends' transports say when a peer is gone or late (gloo raises plain RuntimeErrors).
_COLLECTIVE_SIGNS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "watchdog")


def collective_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because a peer died, closed its connection or timed out."""
    if torch.distributed.is_available() and isinstance(e, torch.distributed.DistError):
        return True
    return isinstance(e, RuntimeError) and any(sign in str(e).lower() for sign in _COLLECTIVE_SIGNS)


def launch_local(nproc: int, entry: Callable[..., Any], *args: Any) -> None:
    """Run ``entry(*args)`` in ``nproc`` processes on this machine, as ``torchrun --standalone`` would.

    torch.distributed's elastic launcher gives each process its rank in the environment (a
    rendezvous on a free local port); ``entry`` joins the group itself (:func:`process_group`).
    When a rank fails the launcher stops the others, and the job ends with the first failure's
    message as one :class:`IsmEdgeError` (its exit code), not the launcher's report.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if launched_ranks() > 1:
        raise IsmEdgeError("--nproc starts the ranks itself: do not run it under torchrun (use one or the other)")
    # As torchrun does: the cores shared out between the processes unless the user chose.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    # The launcher's own failure report (and its "terminating process" notes): one line below instead.
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
        lg.propagate = False
    try:
        elastic_launch(config, _launched)(entry, *args)
    except ChildFailedError as e:
        failed_rank, failure = e.get_first_failure()
        message: Any = failure.message
        if isinstance(message, dict):  # the error file's record: {"message": ..., "extraInfo": ...}
            message = message.get("message", "")
        message = str(message)
        message = message.split(": ", 1)[1] if message.startswith(f"{_ERROR_TAG}: ") else \
            f"rank {failed_rank} failed (exit code {failure.exitcode}): {message}"
        err = IsmEdgeError(message)
        err.exit_code = failure.exitcode if 0 < failure.exitcode < 128 else 1
        raise err from None
    except SignalException:  # Ctrl-C or SIGTERM: the launcher has stopped the ranks; the CLI says "interrupted"
        raise KeyboardInterrupt from None
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.setLevel(level)
            lg.propagate = propagate


_ERROR_TAG = "RankError"


class RankError(Exception):
    """The expected failure of one launched rank, as the launcher reads it back (its one line)."""


def _launched(entry: Callable[..., Any], *args: Any) -> Any:
    """One rank started by :func:`launch_local`: an expected failure is recorded for the launcher
    (its message, no traceback) and ends the process with its exit code, so the others are stopped."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        return entry(*args)
    except IsmEdgeError as e:
        ErrorHandler().record_exception(RankError(str(e)))
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
