"""One rank of a job: a plain class that ``worker_group`` turns into a Ray actor.

It captures its own stdout/stderr into ``<run_dir>/logs/rank_<r>.log``, joins
torch.distributed (gloo on CPU, nccl on GPU) and runs the training loop in an
actor thread, so ``progress()`` and ``stop()`` answer while it trains.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
from datetime import timedelta

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for every rank: torch's and DeepSpeed's default, as before."""
RENDEZVOUS_TIMEOUT = COLLECTIVE_TIMEOUT
"""How long the rendezvous store waits for a rank (env:// rendezvous used the collective timeout too)."""


class RankWorker:
    """One rank; ``rank=None`` makes an idle pool member (``workers/pool.py``) that ``assign`` gives a job."""

    def __init__(self, rank: int | None, world_size: int = 0, run_dir: str = "", storage=None, threads: int = 1):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda_env() else "cuda")
        use_prebuilt_ops()
        self._ctx = None
        self._stop_early = False
        self._log_local = None
        self._store = None  # rank 0's rendezvous store (open_store)
        import torch  # noqa: F401  (before the snapshot below: importing it sets variables of its own)

        import_deepspeed()
        quiet_library_warnings()
        if rank is None:  # a pool member: pay now for what a job's start and first step would
            _preload()
        self._base_env = dict(os.environ)  # what assign() restores: no job's variables survive into the next
        self.rank = None
        if rank is not None:
            self.assign(rank, world_size, run_dir, storage, threads)

    def assign(self, rank: int, world_size: int, run_dir: str, storage, threads: int = 1) -> dict:
        """Make this process rank ``rank`` of a job: a clean environment, the job's thread count and run log.

        Restored here: every environment variable to its value at process start (dropping any MASTER_*,
        RANK, GLOO/NCCL interface or OMP variable set since), ``OMP_NUM_THREADS`` and torch's intra-op
        threads to the job's, and stdout/stderr to the job's rank log."""
        import torch

        os.environ.clear()
        os.environ.update(self._base_env)
        self.rank, self.world_size = rank, world_size
        self.run_dir, self.storage = run_dir, storage
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        self._ctx, self._stop_early = None, False
        self._capture_output()
        return self.info()

    # ------------------------------------------------------------------ plumbing

    def _capture_output(self) -> None:
        if self.storage.is_local:
            log_dir = os.path.join(self.storage.local_path(self.run_dir), "logs")
        else:
            log_dir = tempfile.mkdtemp(prefix=f"sy-logs-r{self.rank}-")
        os.makedirs(log_dir, exist_ok=True)
        self._log_local = os.path.join(log_dir, f"rank_{self.rank}.log")
        fd = os.open(self._log_local, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        print(f"[switchyard] rank {self.rank}/{self.world_size} pid {os.getpid()} on {socket.gethostname()}",
              flush=True)

    def attach(self, run_dir: str) -> None:
        """Reuse this warm rank (torch.distributed still up) for another job of the same shape: its output now
        goes to that job's run directory, and its environment is put back as it was once the gang had joined."""
        os.environ.clear()
        os.environ.update(self._gang_env)
        self.run_dir = run_dir
        self._ctx, self._stop_early = None, False
        self._capture_output()

    def _upload_log(self) -> None:
        if not self.storage.is_local and self._log_local:
            sys.stdout.flush()
            self.storage.fs.put_file(self._log_local, f"{self.run_dir}/logs/rank_{self.rank}.log")

    def info(self) -> dict:
        import ray

        return {"rank": self.rank, "node": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def open_store(self) -> int:
        """(Rank 0) Start the rendezvous store, listening before any rank joins; returns its port.

        With ``env://`` rendezvous rank 0 starts the store inside ``init_process_group``, and a rank that
        gets there first retries its connection with a growing back-off: up to half a second of every
        cold start here. A store that is already up answers a rank's first try."""
        import ray
        import torch.distributed as dist

        self._store = dist.TCPStore(ray.util.get_node_ip_address(), 0, self.world_size, is_master=True,
                                    wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT)
        return self._store.port

    def open_probe(self) -> int:
        """Listen on the node's address for the other ranks' reachability probe; returns the port."""
        import ray

        from workers.network import Listener

        self._listener = Listener(ray.util.get_node_ip_address())
        return self._listener.open()

    def probe_peers(self, peers: list) -> list[dict]:
        from workers.network import probe

        return probe([tuple(p) for p in peers], self.rank)

    def close_probe(self) -> None:
        listener, self._listener = getattr(self, "_listener", None), None
        if listener is not None:
            listener.close()

    def prepare_data(self, source, storage) -> str:
        """Rank 0 builds (or finds) the token cache before the others read it."""
        from data.shards import build_token_cache
        from specs.paths import check_corpus_readable

        check_corpus_readable(source.corpus, storage)  # cluster.yaml's read roots, again, where the files are read

        def progress(line: str) -> None:  # data/prepare.py's progress, also the start-up phase's detail
            print(line, flush=True)
            phases.set_detail(self.storage, self.run_dir, line)

        from workers import phases

        return build_token_cache(source, storage, log=progress)

    def setup(self, master_addr: str, master_port: int, interface: str | None = None) -> None:
        """Join torch.distributed with gloo/NCCL bound to this node's Ray address (never the hostname's)."""
        import deepspeed
        import ray
        import torch

        from workers.network import collective_env

        node_ip = ray.util.get_node_ip_address()
        os.environ.update(collective_env(node_ip, interface))
        print(f"[switchyard] rank {self.rank} collectives on {os.environ['GLOO_SOCKET_IFNAME']} ({node_ip}), "
              f"rendezvous at {master_addr}:{master_port}", flush=True)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if self.rank == 0 and self._store is None:  # no open_store first: rank 0 starts the store here
            self._store = torch.distributed.TCPStore(master_addr, master_port, self.world_size, is_master=True,
                                                     wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT)
        store = self._store if self.rank == 0 else torch.distributed.TCPStore(
            master_addr, master_port, self.world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
        torch.distributed.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                             timeout=COLLECTIVE_TIMEOUT)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # DeepSpeed's backend over that group
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self._gang_env = dict(os.environ)  # what attach() restores for the next job on this gang

    # ------------------------------------------------------------------ training

    def train(self, ctx) -> dict:
        """The job's training loop, any kind. A UserError travels to the caller as itself: the controller
        fails the job at once, the CLI exits with code 2."""
        from specs.errors import UserError
        from workers.train_loop import train

        _log_to_rank_log()
        ctx.stop, ctx.progress = threading.Event(), {}
        if self._stop_early:
            ctx.stop.set()
        self._ctx = ctx
        from specs.paths import check_job_paths

        check_job_paths(ctx.spec, getattr(ctx.storage, "roots", None), where=f"rank {self.rank}")  # again, here
        try:
            return train(ctx)
        except UserError as err:
            log.error("user error: %s", err)
            raise
        except Exception:
            log.exception("training failed")
            raise
        finally:
            self._upload_log()

    def progress(self) -> dict:
        return dict(self._ctx.progress) if self._ctx is not None else {}

    def stop(self) -> None:
        self._stop_early = True
        if self._ctx is not None:
            self._ctx.stop.set()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


PRELOAD = ("deepspeed", "workers.train_loop", "workers.pretrain", "workers.checkpoint_writer", "safetensors.torch",
           "tokenizers", "torch.utils.tensorboard", "numpy.ma")
"""What a job imports on its way to the first step (the loop imports most of it lazily; numpy imports
``numpy.ma`` at the sampler's first ``np.unique``)."""


def use_prebuilt_ops() -> None:
    """Point DeepSpeed at the compiled ops `make install` built into the environment (its shared-memory
    comm op), so that no process compiles them again under its own HOME (about 40 s)."""
    prebuilt = os.path.join(sys.prefix, "torch_extensions")
    if os.path.isdir(prebuilt):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", prebuilt)


LIBRARY_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)
"""(category, message) of warnings a rank's log does not show: ones about a library's own calls into another
(DeepSpeed's ZeRO-2/3 into torch.distributed, on every rank of every job) that a user can do nothing about."""


def quiet_library_warnings() -> None:
    import warnings

    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def import_deepspeed():
    """Import DeepSpeed without letting it import transformers; returns the module.

    Where transformers is installed, DeepSpeed imports all of it at its own import (``deepspeed.linear``'s
    LoRA ``Init``, the hybrid engine's OPT embedding; both guarded by ``except ImportError``), about
    1.7 of a rank's 6 CPU-seconds of DeepSpeed import on this machine, for features Switchyard never uses.
    transformers is hidden only for that import: anything that imports it afterwards gets it as usual."""
    import sys

    if "deepspeed" in sys.modules or "transformers" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["transformers"] = None  # the import system's own "not importable" marker
    try:
        import deepspeed
    finally:
        if sys.modules.get("transformers", 0) is None:
            del sys.modules["transformers"]
    return deepspeed


def _preload() -> None:
    """Import PRELOAD and load DeepSpeed's compiled shared-memory comm op (the rendezvous would)."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional one (TensorBoard): the job goes without it too
            pass
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def _log_to_rank_log() -> None:
    """Records of ``workers.*`` at INFO and above go to this process's stderr (the rank log); once."""
    logger = logging.getLogger("workers")
    if not any(getattr(h, "_switchyard", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._switchyard = True
        handler.setFormatter(logging.Formatter("[switchyard] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _has_cuda_env() -> bool:
    try:
        import ray

        return bool(ray.get_gpu_ids())
    except Exception:
        return False
