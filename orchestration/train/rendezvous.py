"""Ray Train's process-group setup with rank 0's rendezvous store on loopback when the run is on this machine.

``torch.distributed.init_process_group`` rendezvous through a TCPStore that rank 0 hosts. torch 2.13
binds that server to every interface (libuv: ``[::]`` or ``0.0.0.0``; the legacy backend: the wildcard
``getaddrinfo`` returns) whatever MASTER_ADDR or a ``tcp://127.0.0.1:port`` init_method say: it has
no bind-address option or variable. Its one way in is ``TCPStore(master_listen_fd=...)``, a socket
the caller bound. So when every worker's Ray node address is loopback (a Ray that raylm started, or
a simulated cluster whose nodes all live on 127.0.0.1), rank 0 binds 127.0.0.1 on a free port, hands
that socket to its TCPStore, and every worker joins the process group through a store on that port.
Otherwise (a cluster whose nodes have routable addresses) Ray Train's own setup runs unchanged: the
other nodes must reach the store.

Everything else stays Ray Train's: the backend it picked (gloo, or nccl on GPUs), the process-group
timeout, the torch environment variables (RANK, LOCAL_RANK, ...) and the per-worker CUDA device
(TorchConfig's train-function context), and the shutdown. The backend subclasses Ray's own torch
backend, as Ray's ``TorchftConfig`` does.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"


class LoopbackStoreConfig(TorchConfig):
    """Ray Train's TorchConfig whose rendezvous store listens on 127.0.0.1 when every worker's node does."""

    @property
    def backend_cls(self):
        return LoopbackStoreBackend


class LoopbackStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        if not all(worker_group.execute(node_is_loopback)):
            super().on_start(worker_group, backend_config)
            return
        port, listen_fd = worker_group.execute_single(0, bind_store_socket)
        worker_group.execute(_set_torch_distributed_env_vars)
        world_size = len(worker_group)
        # Concurrently: rank 0's store waits for every worker to connect before it returns
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    join_process_group,
                    backend=backend_config.backend,
                    world_rank=rank,
                    world_size=world_size,
                    port=port,
                    listen_fd=listen_fd if rank == 0 else None,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world_size)
            ]
        )


def node_is_loopback() -> bool:
    """Whether this worker's Ray node address is a loopback address."""
    return ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback


def bind_store_socket() -> tuple[int, int]:
    """On rank 0: a TCP socket bound to 127.0.0.1 on a free port; returns (port, its file descriptor).

    The descriptor stays open in this worker process until ``join_process_group`` (a later call on
    the same actor) hands it to the TCPStore, which listens on it and closes it with the process group.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    return sock.getsockname()[1], sock.detach()


def join_process_group(
    backend: str, world_rank: int, world_size: int, port: int, listen_fd: int | None, timeout_s: float
) -> None:
    """Join the default process group through the TCPStore on 127.0.0.1:``port`` (hosted by rank 0 on
    ``listen_fd``), with Ray Train's timeout for both the store and the group."""
    import torch.distributed as dist

    # What env:// would have read; DeepSpeed's CPU shared-memory comm names its segment from them
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)
    if backend == "nccl":
        # As Ray Train's own setup: a timed-out NCCL collective fails the worker instead of hanging it
        if not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & os.environ.keys():
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        LOOPBACK, port, world_size, is_master=world_rank == 0, timeout=timeout, master_listen_fd=listen_fd
    )
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)
