"""Pruned checkpoints and models pruned by torch.nn.utils.prune.

- ``restore(model, state_dict)``: a pruned model's ``state_dict`` holds each pruned weight (zeros included) and
  its ``<name>_mask`` buffer; a freshly built, unpruned ``model`` has no such buffers, so ``load_state_dict``
  would reject them. ``restore`` prunes ``model`` with those masks first, then loads, so the model ends up pruned
  exactly as the one that was saved. A checkpoint of a model pruned by torch (``<name>_orig`` + float
  ``<name>_mask``) loads the same way, as ``orig * mask``.
- ``restore(model, directory)``: the same from what ``save_pretrained`` wrote (``model.safetensors``, sharded
  safetensors with their index, or ``pytorch_model.bin``): transformers' ``from_pretrained`` drops the
  ``<name>_mask`` buffers as unexpected keys (the zeros survive, the masks do not, and the next optimizer step
  regrows every pruned weight), so ``restore(model, directory)`` right after ``from_pretrained`` puts them back.
  Tied copies a safetensors file omits (GPT-2's ``lm_head.weight``, the same tensor as ``wte.weight``) are not
  missing keys: they load from the tensor they are tied to.
- ``masks_from_zeros(model, layers=None)``: masks rebuilt from the exact zeros of the linear layers (or the layers
  matching ``layers``, globs on qualified names), for checkpoints saved without their masks.
- ``from_torch(model)``: turns every tensor pruned by torch.nn.utils.prune (``<name>_orig`` parameter, mask
  buffer and forward pre-hook) into nnopt's contract in place; the ``<name>_orig`` Parameter object becomes
  ``<name>`` again, so an optimizer built on it keeps working.
"""

import fnmatch
import json
import os

import torch
from torch.nn.utils import prune as _tp

from nnopt.layers import is_linear_like
from nnopt.prune._contract import MASK_SUFFIX, apply_mask, current_mask

_ORIG = "_orig"


def _split(key):
    prefix, _, leaf = key.rpartition(".")
    return prefix, leaf


def _pruned_entries(model, state_dict):
    """{(module_path, name): (mask key, orig key or None)} for the pruned tensors ``state_dict`` describes."""
    found = {}
    for key in state_dict:
        prefix, leaf = _split(key)
        if not leaf.endswith(MASK_SUFFIX):
            continue
        name = leaf[: -len(MASK_SUFFIX)]
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        if name not in module._parameters and name not in module._buffers:
            continue  # a buffer that merely ends in "_mask" (an attention mask, say), not a pruning mask
        dot = prefix + "." if prefix else ""
        orig = dot + name + _ORIG
        found[(prefix, name)] = (key, orig if orig in state_dict and dot + name not in state_dict else None)
    return found


def load_checkpoint(path):
    """The state dict saved at ``path``: a file (``.safetensors``, or anything ``torch.load`` reads) or a directory
    written by ``save_pretrained`` (``model.safetensors``, its sharded index, or ``pytorch_model.bin``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return load_checkpoint(os.path.join(path, name))
        raise FileNotFoundError(f"restore: {path} holds no model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"restore: no such file or directory: {path}")
    if path.endswith(".index.json"):
        with open(path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(load_checkpoint(os.path.join(os.path.dirname(path), name)))
        return sd
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _tied_copies(model, sd):
    """{missing key: present key} for the tensors of ``model`` that ``sd`` omits but holds under a tied name."""
    by_id = {}
    for key, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(key)
    out = {}
    for keys in by_id.values():
        present = [k for k in keys if k in sd]
        if present:
            out.update({k: present[0] for k in keys if k not in sd})
    return out


def restore(model, state_dict, strict=True):
    """Loads a pruned model's ``state_dict`` into ``model`` (built unpruned), pruning it as the saved one was.

    ``state_dict``: a dict, or a path (a file, or a directory ``save_pretrained`` wrote; see ``load_checkpoint``).
    Keys a checkpoint omits because they are tied to a key it holds are filled from it. Returns
    ``load_state_dict``'s (missing_keys, unexpected_keys). With ``strict`` (default) mismatched keys or shapes raise
    RuntimeError, as ``load_state_dict`` does, before ``model`` is changed.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_checkpoint(state_dict)
    entries = _pruned_entries(model, state_dict)
    sd = dict(state_dict)
    for key, present in _tied_copies(model, sd).items():
        sd[key] = sd[present]
    for (prefix, name), (mask_key, orig_key) in entries.items():
        if orig_key is not None:  # torch's layout: the weight is orig * mask
            dot = prefix + "." if prefix else ""
            sd[dot + name] = sd.pop(orig_key) * (sd[mask_key] != 0)
        sd[mask_key] = sd[mask_key] != 0
    if strict:
        own = dict(model.state_dict())
        for (prefix, name), (mask_key, _) in entries.items():
            own[mask_key] = sd[mask_key]
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        bad = [k for k in own.keys() & sd.keys()
               if isinstance(sd[k], torch.Tensor) and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad:
            raise RuntimeError(f"restore: state_dict does not fit {type(model).__name__}: missing keys {missing}, "
                               f"unexpected keys {unexpected}, shape mismatch for {sorted(bad)}")
    for (prefix, name), (mask_key, _) in entries.items():
        apply_mask(model.get_submodule(prefix), name, sd[mask_key])
    result = model.load_state_dict(sd, strict=strict)
    for (prefix, name), (mask_key, _) in entries.items():
        module = model.get_submodule(prefix)
        apply_mask(module, name, module._buffers[name + MASK_SUFFIX])  # loaded weights obey the loaded masks
    return result


def from_torch(model):
    """Converts every tensor of ``model`` pruned by torch.nn.utils.prune to nnopt's contract, in place."""
    for module in model.modules():
        hooks = [(k, h) for k, h in module._forward_pre_hooks.items() if isinstance(h, _tp.BasePruningMethod)]
        for key, hook in hooks:
            name = hook._tensor_name
            mask = module._buffers[name + MASK_SUFFIX] != 0
            hook.remove(module)  # the weight becomes orig * mask, in the <name>_orig Parameter object
            del module._forward_pre_hooks[key]
            apply_mask(module, name, mask)
    return model


def masks_from_zeros(model, layers=None):
    """Masks every linear layer's weight (``nn.Linear``, ``Conv1D``; or the layers whose qualified names match the
    glob(s) ``layers``) at its exact zeros, on top of any mask it has; returns the names of the layers masked
    (a weight with no zero and no mask is left alone).

    For a pruned model loaded without its masks: its zeros are where it was pruned. ValueError when ``layers``
    matches no layer with a weight.
    """
    globs = None if layers is None else ((layers,) if isinstance(layers, str) else tuple(layers))
    chosen = []
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if isinstance(module, torch.nn.Module) else None
        if not isinstance(w, torch.Tensor):
            continue
        if globs is None and not is_linear_like(module):
            continue
        if globs is not None and not any(fnmatch.fnmatchcase(name, g) for g in globs):
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError(f"masks_from_zeros: no layer of {type(model).__name__} matches layers={layers!r}")
    masked = []
    for name, module in chosen:
        nonzero = module.weight.detach() != 0
        if bool(nonzero.all()) and "weight" + MASK_SUFFIX not in module._buffers:
            continue
        apply_mask(module, "weight", current_mask(module, "weight") & nonzero)
        masked.append(name)
    return masked
