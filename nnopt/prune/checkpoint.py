"""Pruned checkpoints and models pruned by torch.nn.utils.prune.

- ``restore(model, state_dict)``: a pruned model's ``state_dict`` holds each pruned weight (zeros included) and
  its ``<name>_mask`` buffer; a freshly built, unpruned ``model`` has no such buffers, so ``load_state_dict``
  would reject them. ``restore`` prunes ``model`` with those masks first, then loads, so the model ends up pruned
  exactly as the one that was saved. A checkpoint of a model pruned by torch (``<name>_orig`` + float
  ``<name>_mask``) loads the same way, as ``orig * mask``.
- ``from_torch(model)``: turns every tensor pruned by torch.nn.utils.prune (``<name>_orig`` parameter, mask
  buffer and forward pre-hook) into nnopt's contract in place; the ``<name>_orig`` Parameter object becomes
  ``<name>`` again, so an optimizer built on it keeps working.
"""

import torch
from torch.nn.utils import prune as _tp

from nnopt.prune._contract import MASK_SUFFIX, apply_mask

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


def restore(model, state_dict, strict=True):
    """Loads a pruned model's ``state_dict`` into ``model`` (built unpruned), pruning it as the saved one was.

    Returns ``load_state_dict``'s (missing_keys, unexpected_keys). With ``strict`` (default) mismatched keys
    or shapes raise RuntimeError, as ``load_state_dict`` does, before ``model`` is changed.
    """
    entries = _pruned_entries(model, state_dict)
    sd = dict(state_dict)
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
