"""Process-group set-up shared by the stages, with the guards that catch silently degraded launches.

On a machine without CUDA, `accelerate launch --multi_gpu` starts processes that each believe
world=1 unless the process group is created with gloo; we always ask for gloo there and then
check that accelerate's view of the world matches the launcher's WORLD_SIZE.
"""

from __future__ import annotations

import os


class LaunchError(RuntimeError):
    """The launch is not what it claims to be (wrong world size or backend)."""


def expected_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def partial_state():
    """accelerate's PartialState, gloo when there is no GPU, checked against WORLD_SIZE."""
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        state = PartialState()
    else:
        # cpu=True would make accelerate drop DeepSpeed later in the same process (train after
        # precompute in one launch): with DeepSpeed, only the gloo backend is forced.
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        kwargs = {"backend": "gloo"} if expected_world_size() > 1 else {}
        state = PartialState(cpu=not deepspeed, **kwargs)
    check_world(state.num_processes)
    return state


def check_world(num_processes: int) -> None:
    want = expected_world_size()
    if num_processes != want:
        raise LaunchError(
            f"the launcher started WORLD_SIZE={want} processes but this process sees {num_processes}: "
            f"they would run as independent copies. On a CPU-only machine launch with "
            f"`accelerate launch --multi_gpu --num_processes N` (cogfun selects gloo itself) or torchrun.")


def broadcast(obj, state):
    """Rank 0's `obj` on every rank."""
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(objs: list, state) -> list:
    """Concatenate per-rank lists on every rank (rank order)."""
    if state.num_processes == 1:
        return list(objs)
    from accelerate.utils import gather_object

    return gather_object(list(objs))
