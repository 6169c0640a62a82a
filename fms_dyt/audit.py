"""What a training step makes a GPU wait for, counted on any device: device-to-host reads and
collectives.

On a GPU the CPU runs ahead of the device, queueing kernels; a read of a device value on the host
(``.item()``, ``.tolist()``, ``bool(tensor)``, a copy to the CPU) drains that queue, and every
collective is a round trip across all ranks. Neither can be timed on a CPU, but both can be
counted there: every such read reaches the dispatcher as ``aten._local_scalar_dense`` (or
``aten.item``, or a copy whose source is not on the CPU), and every collective as a ``c10d`` op.
:class:`StepAudit` is a ``TorchDispatchMode`` that counts them, so a test on gloo ranks and the
simulator on fake tensors count what a GPU run would pay. On a CPU run a ``.item()`` of a CPU
tensor is counted too: it is the same line of code that would sync on a GPU.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass_type

# Ops that read a device value on the host.
_HOST_READS = {"aten._local_scalar_dense", "aten.item"}
# Copies that may move a device tensor to the host: counted when the source is not on the CPU.
_COPIES = {"aten._to_copy", "aten.copy_", "aten.to"}
# What a c10d op can be; anything else in those namespaces (``_wrap_tensor_autograd``) moves no data.
_KINDS = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast", "barrier", "reduce", "gather",
          "scatter", "send", "recv")


def _op_name(func) -> str:
    """``aten._local_scalar_dense`` for ``aten._local_scalar_dense.default``."""
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def collective_kind(func) -> str | None:
    """The collective a ``c10d`` op performs (``allreduce``, ``allgather``, ``reduce_scatter``,
    ``broadcast``, ``barrier``, ...), or None for any other op (``wait_tensor`` included)."""
    if func.namespace not in ("c10d", "_c10d_functional"):
        return None
    name = func._schema.name.split("::")[-1].strip("_").replace("all_", "all")
    if name.startswith(("wait", "wrap")):  # wait_tensor, _wrap_tensor_autograd: no communication
        return None
    for kind in ("allgather", "reduce_scatter", "allreduce", "alltoall"):
        if kind in name:
            return kind
    kind = name.removesuffix("_base").split("_")[0]
    return kind if kind in _KINDS else None


def process_groups(args):
    """The process groups among a c10d op's arguments: boxed (``c10d`` ops) or named by a string
    (``_c10d_functional`` ops, e.g. the all-reduce of a DTensor's norm)."""
    for a in args:
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            yield torch.distributed.ProcessGroup.unbox(a)
        elif isinstance(a, str):
            try:
                yield torch.distributed.distributed_c10d._resolve_process_group(a)
            except (RuntimeError, ValueError, KeyError):
                pass  # another string argument, e.g. the reduce op ("sum")


def _group(args) -> str:
    """The description of the process group a c10d op runs on (``default_pg``, ``mesh_shard``,
    or what ``new_group(group_desc=...)`` named it)."""
    for group in process_groups(args):
        return group.group_desc or group.group_name
    return "?"


class StepAudit(TorchDispatchMode):
    """Counts device-to-host reads and collectives while active.

    ``host_reads``: op name -> count; ``collectives``: (kind, group name) -> count;
    ``collective_bytes``: (kind, group name) -> bytes of the tensors handed to the collective
    (for an all-gather or reduce-scatter, the larger side). ``reset()`` clears all three.
    """

    def __init__(self):
        super().__init__()
        self.host_reads: Counter = Counter()
        self.collectives: Counter = Counter()
        self.collective_bytes: Counter = Counter()

    def reset(self) -> None:
        self.host_reads.clear()
        self.collectives.clear()
        self.collective_bytes.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            # A DTensor op: let DTensor run it, so that the local ops and the collectives it issues
            # (a norm's reduction, a redistribution) come back here and are counted.
            return NotImplemented
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in _HOST_READS:
            self.host_reads[name] += 1
        elif name in _COPIES and self._to_host(args, kwargs):
            self.host_reads[name] += 1
        else:
            kind = collective_kind(func)
            if kind is not None:
                key = (kind, _group(list(args) + list(kwargs.values())))
                self.collectives[key] += 1
                sizes = [t.numel() * t.element_size() for t in _tensors(list(args))]
                self.collective_bytes[key] += max(sizes, default=0)
        return func(*args, **kwargs)

    @staticmethod
    def _to_host(args, kwargs) -> bool:
        """A copy whose source is off the CPU and whose result is on it."""
        if not args or not isinstance(args[0], torch.Tensor):
            return False
        if args[0].device.type in ("cpu", "meta"):
            # aten.copy_(dst, src): dst on the CPU, src on a device
            return (len(args) > 1 and isinstance(args[1], torch.Tensor) and args[0].device.type == "cpu"
                    and args[1].device.type not in ("cpu", "meta"))
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu"

    def total_host_reads(self) -> int:
        return sum(self.host_reads.values())

    def by_kind(self) -> dict[str, dict[str, int]]:
        """``{kind: {"count": n, "bytes": b}}`` summed over groups."""
        out: dict[str, dict[str, int]] = {}
        for (kind, _), n in self.collectives.items():
            entry = out.setdefault(kind, {"count": 0, "bytes": 0})
            entry["count"] += n
        for (kind, _), b in self.collective_bytes.items():
            out[kind]["bytes"] += b
        return out
