"""Forgetting (Zhang et al., "Forgedit: Text Guided Image Editing via Learning and Forgetting",
2023): at sampling time, named groups of the fine-tuned UNet go back to the base model's
weights, trading the input's fidelity for editability without training again.

A strategy names the groups that are *reverted*, by parameter name, as Forgedit's code matches
them (witcherofresearch/Forgedit, its vanilla pipeline): the encoder is `down_blocks`, the
decoder `up_blocks`; "kv" keeps the cross-attention keys and values (`attn2.to_k`, `attn2.to_v`)
fine-tuned, "attn" keeps every self- and cross-attention projection (`attn1.*`, `attn2.*`).
Everything outside the named blocks keeps its fine-tuned values. Strength 1 reverts the groups
fully (Forgedit's only setting in practice); s in (0, 1) moves them the fraction s of the way
from θ' back to θ. Only the base model forgets: a cascade's super-resolution stages keep theirs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from .errors import InputError

_KV = ("attn2.to_k", "attn2.to_v")
_ATTENTION = ("attn1.", "attn2.")


def _block(prefix: str, keep: tuple[str, ...] = (), keep_block: str | None = None):
    """Reverts the parameters under `prefix` except those containing one of `keep`, and except
    the whole of `keep_block`."""
    def reverts(name: str) -> bool:
        if not name.startswith(prefix) or (keep_block and name.startswith(keep_block)):
            return False
        return not any(k in name for k in keep)
    return reverts


# strategy -> which parameter names go back to the base model ("none": nothing)
STRATEGIES: dict[str, Callable[[str], bool] | None] = {
    "none": None,
    "encoderkv": _block("down_blocks.", _KV),
    "noencoder": _block("down_blocks."),
    "encoderattn": _block("down_blocks.", _ATTENTION),
    "encoderattn+encoder1": _block("down_blocks.", _ATTENTION, keep_block="down_blocks.1."),
    "decoderkv": _block("up_blocks.", _KV),
    "nodecoder": _block("up_blocks."),
    "decoderattn": _block("up_blocks.", _ATTENTION),
    "decoderattn+decoder2": _block("up_blocks.", _ATTENTION, keep_block="up_blocks.2."),
}
LORA_PARTS = (".lora_A.", ".lora_B.")  # how peft names an adapter's two matrices
# `forget="auto"` renders the session with each of these (one per kind of group: nothing, the
# encoder but its text keys and values, the whole encoder, the decoder's non-attention layers),
# and `--eta auto` then picks the strategy with η (auto_eta.choose_strategy)
AUTO_CANDIDATES = ("none", "encoderkv", "noencoder", "decoderattn")
CHOICES = (*STRATEGIES, "auto")  # EditConfig.forget


def forget(backend, delta, strategy: str, strength: float = 1.0):
    """The session's delta with the strategy's groups moved back to the base model by
    `strength`: a full fine-tune's tensors blended with the base weights (dropped at strength
    1), a LoRA adapter's B matrices scaled by 1 − strength (its update B·A with them). The base
    model and the session are left as they are."""
    from .backends.base import Delta

    reverts = STRATEGIES[strategy]
    if reverts is None or strength == 0:
        return delta
    check_forgetting(backend, strategy)
    base = dict(backend.stage_unets()["base"].named_parameters())
    if not reverted_elements(delta, strategy):
        why = " (a LoRA adapter trains attention layers only)" if delta.kind == "lora" else ""
        warnings.warn(f"forgetting {strategy} changes nothing here: the session trained none "
                      f"of the weights it reverts{why}", stacklevel=2)
        return delta
    tensors = {}
    for name, value in delta.tensors.items():
        # another stage's tensor, or a group that stays tuned
        if "/" in name or not reverts(_module(name, delta.kind)):
            tensors[name] = value
        elif delta.kind == "lora":
            tensors[name] = value * (1 - strength) if ".lora_B." in name else value
        elif strength < 1:
            original = base[name].detach().to(value.device, value.dtype)
            tensors[name] = value + strength * (original - value)
    return Delta(delta.kind, tensors, delta.lora_rank)


def reverted_elements(delta, strategy: str) -> int:
    """How many of the session's trained numbers the strategy reverts (none, for instance,
    when a LoRA adapter, which trains attention layers only, meets an "attn" strategy)."""
    reverts = STRATEGIES[strategy]
    if reverts is None:
        return 0
    return sum(value.numel() for name, value in delta.tensors.items()
               if "/" not in name and reverts(_module(name, delta.kind)))


def candidates(delta) -> list[str]:
    """The strategies `forget="auto"` renders for this session, from the one that reverts the
    least of it to the one that reverts the most: "none", then those of AUTO_CANDIDATES that
    change something."""
    sizes = {s: reverted_elements(delta, s) for s in AUTO_CANDIDATES[1:]}
    return ["none", *sorted((s for s, size in sizes.items() if size), key=sizes.get)]


def check_forgetting(backend, strategy: str) -> None:
    """A strategy names a UNet's encoder or decoder blocks; other denoisers have neither."""
    names = (name for name, _ in backend.stage_unets()["base"].named_parameters())
    if not any(name.startswith(("down_blocks.", "up_blocks.")) for name in names):
        raise InputError(f"forgetting ({strategy}) reverts parts of a UNet's encoder or "
                         f"decoder; {backend.family}'s denoiser has neither")


def _module(name: str, kind: str) -> str:
    """The weight a delta tensor belongs to: a LoRA matrix's is the layer it adapts."""
    if kind != "lora":
        return name
    return next((name.split(part)[0] for part in LORA_PARTS if part in name), name)
