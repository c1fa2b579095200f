"""A PyTorch DDP communication hook that sends each gradient bucket through a fedquant codec.

The pattern is torch's PowerSGD hook (``torch.distributed.algorithms.ddp_comm_hooks.
powerSGD_hook``; Vogels et al., "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization", NeurIPS 2019, https://arxiv.org/abs/1905.13727): an explicit
state object, plain allreduce for the first ``start_iter`` steps, optional error feedback,
registered with ``ddp_model.register_comm_hook(state, hook)``.

Each rank encodes its (error-corrected) bucket with the codec, for example EDEN (Vargaftik
et al., "EDEN: Communication-Efficient and Robust Distributed Mean Estimation for Federated
Learning", ICML 2022, https://arxiv.org/abs/2108.08842) or QUIC-FL (Ben-Basat et al.,
"Accelerating Federated Learning with Quick Distributed Mean Estimation", ICML 2024,
https://arxiv.org/abs/2205.13341). The serialized payloads (``len(enc.to_bytes())`` bytes)
are all-gathered, and every rank computes the same ``fq.decode_mean`` over the same ordered
list of payloads, so the replicas receive bit-identical gradients and stay identical.

Seeds: every rank's seed derives from (state seed, step, bucket index, rank) by
:func:`fedquant.random.derive_seed`, so any rank regenerates any other rank's randomness
from the payload alone. The ranks' rotations are independent (EDEN's errors average out
only then); a codec with a ``round_seed`` parameter (QUIC-FL) gets the (step, bucket) seed
as its round seed, shared by all ranks, so ``decode_mean`` sums in the rotated domain.

Example::

    from fedquant.ddp import CodecState, codec_hook
    state = CodecState(fq.get_codec("eden", bits=2))
    ddp_model.register_comm_hook(state, codec_hook)
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook compares the hook's
# annotations with dist.GradBucket and torch.futures.Future[torch.Tensor] as objects.
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from fedquant.codecs.base import Codec, get_codec
from fedquant.mean import decode, decode_mean
from fedquant.random import derive_seed
from fedquant.wire import Encoded, WireError

# A peer's declared payload length above this many bytes per coordinate (plus a header
# allowance) is refused before any allocation: no codec sends more than a float64 each.
_MAX_BYTES_PER_COORD = 8
_MAX_HEADER_BYTES = 1 << 16
_LENGTH_BYTES = 8  # the int64 length every rank all-gathers first


class CodecState:
    """State of :func:`codec_hook`, kept between steps (pattern of torch's PowerSGDState).

    Args:
        codec (fq.Codec | str): the codec, or a codec spec string such as
            ``"eden:bits=2"`` (``fq.get_codec``'s syntax).
        process_group (ProcessGroup | None, default None): the group to average over;
            None is the default (world) group.
        error_feedback (bool, default True): add each bucket's previous compression error
            (its input minus this rank's own reconstruction) to the next step's input.
        start_iter (int, default 2): steps of plain allreduce before compression starts.
            With error feedback it must be at least 2, as for PowerSGD: DDP rebuilds its
            buckets after the first step, so a residual kept before that could belong to
            other parameters.
        seed (int, default 0): the run's seed in [0, 2^64); all ranks must pass the same.

    Attributes read by benchmarks: ``iter`` (steps done), ``bytes_sent`` (this rank's
    payload bytes, ``len(enc.to_bytes())`` summed over compressed buckets, plus
    ``numel * element_size`` per warm-up bucket), ``wire_bytes`` (what this rank hands to
    the collectives: payloads padded to the longest rank's plus the 8-byte length, and the
    warm-up buffers) and ``residuals`` (error feedback, by bucket index).
    """

    __slots__ = ("process_group", "codec", "error_feedback", "start_iter", "seed",
                 "iter", "residuals", "bytes_sent", "wire_bytes")

    def __init__(self, codec: Codec | str, process_group: dist.ProcessGroup | None = None,
                 error_feedback: bool = True, start_iter: int = 2, seed: int = 0):
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be a bool, got {error_feedback!r}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an integer >= 0, got {start_iter!r}")
        if error_feedback and start_iter < 2:
            raise ValueError(f"start_iter must be >= 2 when error_feedback is on (DDP rebuilds "
                             f"its buckets after the first step), got {start_iter}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        self.codec = _resolve_codec(codec)
        self.process_group = process_group
        self.error_feedback = error_feedback
        self.start_iter = start_iter
        self.seed = seed
        self.iter = 0
        self.residuals: dict[int, torch.Tensor] = {}
        self.bytes_sent = 0
        self.wire_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the process group, which cannot be pickled (as PowerSGDState)."""
        return {k: getattr(self, k) for k in self.__slots__ if k != "process_group"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled state; the process group becomes the default group (None)."""
        self.process_group = None
        for k, v in state.items():
            setattr(self, k, v)

    def _maybe_increase_iter(self, bucket: dist.GradBucket) -> None:
        # one step is over when DDP hands over its last bucket (as PowerSGDState counts)
        if bucket.is_last():
            self.iter += 1


def _resolve_codec(codec: Codec | str) -> Codec:
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        return get_codec(codec)  # a spec "eden:bits=2"; ValueError names a bad codec or key
    raise ValueError(f"codec must be an fq.Codec or a codec spec string such as 'eden:bits=2', "
                     f"got {type(codec).__name__}")


def step_seed(seed: int, step: int, bucket_index: int) -> int:
    """The seed all ranks share for one bucket at one step (a QUIC-FL round seed)."""
    return derive_seed(derive_seed(seed, step), bucket_index)


def rank_seed(shared_seed: int, rank: int) -> int:
    """One rank's encoding seed for a (step, bucket): independent across ranks."""
    return derive_seed(shared_seed, rank)


def codec_for_step(codec: Codec, shared_seed: int) -> Codec:
    """`codec` with its ``round_seed`` set to `shared_seed` where it has that parameter."""
    params = codec.params()
    if "round_seed" not in params or params["round_seed"] == shared_seed:
        return codec
    return type(codec)(**{**params, "round_seed": shared_seed})


def _all_gather_bytes(blob: bytes, group: dist.ProcessGroup, device: torch.device,
                      max_len: int) -> tuple[list[bytes], int]:
    """Every rank's `blob`, in rank order, and the padded row length that was sent."""
    world = dist.get_world_size(group)
    length = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(t) for t in lengths]
    for r, n in enumerate(sizes):
        if not 0 < n <= max_len:
            raise WireError(f"rank {r} declared a payload of {n} bytes; expected 1..{max_len} "
                            "for this bucket (do all ranks run the same codec?)")
    row = torch.zeros(max(sizes), dtype=torch.uint8)
    row[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    row = row.to(device)  # NCCL gathers device tensors, gloo either
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row, group=group)
    return [r[:n].cpu().numpy().tobytes() for r, n in zip(rows, sizes, strict=True)], row.numel()


def codec_hook(state: CodecState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Encode this rank's bucket, all-gather every rank's payload, return their decoded mean.

    Sends ``len(enc.to_bytes())`` bytes per rank and bucket (padded to the longest rank's
    payload, plus an 8-byte length); every rank restores all payloads and computes the same
    ``fq.decode_mean``, written in place into the bucket. Runs synchronously: the returned
    future is already complete, so compression does not overlap the rest of the backward
    pass. The first ``state.start_iter`` steps are torch's plain ``allreduce_hook``.

    Example::
        >>> ddp_model.register_comm_hook(CodecState(fq.get_codec("eden", bits=2)), codec_hook)
    """
    if not isinstance(state, CodecState):
        raise ValueError(f"state must be a fedquant.ddp.CodecState, got {type(state).__name__}")
    buffer = bucket.buffer()
    if state.iter < state.start_iter:
        nbytes = buffer.numel() * buffer.element_size()
        state.bytes_sent += nbytes
        state.wire_bytes += nbytes
        state._maybe_increase_iter(bucket)
        return default_hooks.allreduce_hook(state.process_group, bucket)

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    index = bucket.index()
    x = buffer
    if state.error_feedback:
        residual = state.residuals.get(index)
        if residual is not None:
            if residual.shape != buffer.shape:
                raise ValueError(f"bucket {index} has {buffer.numel()} elements but its "
                                 f"residual {residual.numel()}: DDP rebuilt its buckets after "
                                 f"compression started; raise start_iter")
            x = buffer + residual
    shared = step_seed(state.seed, state.iter, index)
    codec = codec_for_step(state.codec, shared)
    rank = dist.get_rank(group)
    blob = codec.encode(x, seed=rank_seed(shared, rank)).to_bytes()
    numel = buffer.numel()
    blobs, row_len = _all_gather_bytes(blob, group, buffer.device,
                                       _MAX_BYTES_PER_COORD * numel + _MAX_HEADER_BYTES)
    encs = [Encoded.from_bytes(b, max_elements=numel) for b in blobs]
    for r, enc in enumerate(encs):
        if enc.shape != tuple(buffer.shape):
            raise WireError(f"rank {r} sent shape {list(enc.shape)} for bucket {index}, "
                            f"expected {list(buffer.shape)}")
    # every rank decodes the same payloads in the same (rank) order: identical replicas
    mean = decode_mean(encs, device=buffer.device)
    if state.error_feedback:
        # the residual is what this rank's own payload lost: its input minus the rank's
        # reconstruction as every receiver decodes it
        state.residuals[index] = x - decode(encs[rank], buffer.device)
    buffer.copy_(mean)
    state.bytes_sent += len(blob)
    state.wire_bytes += row_len + _LENGTH_BYTES
    state._maybe_increase_iter(bucket)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut


__all__ = ["CodecState", "codec_for_step", "codec_hook", "rank_seed", "step_seed"]
