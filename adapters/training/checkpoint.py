"""Training checkpoints: adapter tensors, AdamW state, the step and RNG states.

Only tensors and primitive containers are written (``torch.save``), the file is replaced atomically
(temp file, fsync, rename) and read back with ``weights_only=True``, so loading a checkpoint never
runs pickled code. ``identity`` records what run the checkpoint belongs to; resuming a different
run (other kind, config, backbone, data size, schedule) is refused instead of silently mixing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from petserve.adapters.atomic_file import write_atomically

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainState:
    step: int                           # updates done
    params: dict[str, torch.Tensor]
    optimizer: dict                     # torch.optim.AdamW.state_dict()
    identity: dict                      # primitives that must match to resume
    torch_rng: torch.Tensor


def save_checkpoint(directory: Path, state: TrainState) -> Path:
    """Write ``directory/checkpoint.pt`` atomically; returns its path."""
    path = Path(directory) / CHECKPOINT_NAME
    payload = {"step": state.step, "identity": state.identity, "torch_rng": state.torch_rng,
               "params": {k: v.detach().cpu().clone() for k, v in state.params.items()},
               "optimizer": state.optimizer}
    return write_atomically(path, lambda f: torch.save(payload, f))


def load_checkpoint(directory: Path, identity: dict) -> TrainState | None:
    """The checkpoint in ``directory`` (None if there is none). Raises ValueError when it is
    unreadable or belongs to another run (the message names the first differing field)."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable petserve checkpoint ({type(e).__name__})") from None
    if not isinstance(raw, dict) or not {"step", "identity", "params", "optimizer"} <= set(raw):
        raise ValueError(f"{path}: not a petserve training checkpoint")
    for key in sorted(set(identity) | set(raw["identity"])):
        if raw["identity"].get(key) != identity.get(key):
            raise ValueError(f"{path} belongs to another run: {key} is "
                             f"{raw['identity'].get(key)!r} there, {identity.get(key)!r} now")
    return TrainState(int(raw["step"]), raw["params"], raw["optimizer"], raw["identity"],
                      raw.get("torch_rng", torch.get_rng_state()))
