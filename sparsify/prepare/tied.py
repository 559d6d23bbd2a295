"""Tied weights at build time: a rewritten layer whose weight another module also registers (an
embedding tied to the LM head) is handled as the recipe's ``options.tied`` says:

* ``"share"`` (default): the rewritten layer owns the mask (or threshold) and every other user
  computes with its effective weight (:mod:`sparsify.core.tied`): one mask, both uses, the same
  parameter in ``state_dict`` and after ``finalize``. Where that is impossible (a method that
  widens the weight, SAS; a user other than an ``nn.Embedding`` or a layer of the owner's class)
  ``sparsify`` raises, naming the modules and the option that leaves the layer dense;
* ``"dense"``: the layer stays dense (with a warning) and the plan says why;
* ``"error"``: ``sparsify`` refuses any tied layer a rule matches.

``plan`` never raises: it lists what ``sparsify`` would refuse, with the same message.
"""
from __future__ import annotations

import warnings

from torch import nn

from passes import set_submodule

from sparsify.core.tied import TiedUse, tied_user, why_not_shared

__all__ = ["param_owners", "tied_names", "tie_decision", "share_tied", "module_aliases", "point_aliases", "TIED_MODES"]

TIED_MODES = ("share", "dense", "error")
TIED_DENSE = "(options.tied is 'dense')"  # in the plan's reason: sparsify() warns it once, by the layer's name


def param_owners(root: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> qualified names it is registered under`` (one walk of the model, so that
    checking every layer for ties costs one pass, not one per layer).

    >>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    >>> head.weight = emb.weight
    >>> param_owners(nn.ModuleDict({"emb": emb, "head": head}))[id(emb.weight)]
    ['emb.weight', 'head.weight']
    """
    owners: dict[int, list[str]] = {}
    for other, m in root.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{other}.{pname}" if other else pname)
    return owners


def tied_names(root: nn.Module, name: str, module: nn.Module, owners: dict[int, list[str]] | None = None) -> list[str]:
    """The other places the weight of the layer ``name`` is registered (``"emb.weight"``).
    ``owners``: :func:`param_owners` of ``root``, when the caller checks many layers.

    >>> emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    >>> head.weight = emb.weight
    >>> tied_names(nn.ModuleDict({"emb": emb, "head": head}), "head", head)
    ['emb.weight']
    """
    w = getattr(module, "weight", None)
    if w is None:
        return []
    owners = param_owners(root) if owners is None else owners
    try:
        now = root.get_submodule(name)  # rewritten already by an earlier call of the same layer
    except AttributeError:  # a site that is no module (a function call's node)
        now = module
    out = []
    for full in owners.get(id(w), ()):
        other = full.rpartition(".")[0]
        # the layer itself, or an enclosing module holding the same tensor: the one being rewritten
        # through this layer (MultiheadAttention's in_proj_weight behind its in_proj view, see hidden.py)
        if other == name or not other or name.startswith(f"{other}."):
            continue
        # the layer itself under another name (rewritten already, by an earlier call through an aliased
        # parent): one layer, no tie
        if root.get_submodule(other) in (module, now):
            continue
        out.append(full)
    return out


def _problem(root: nn.Module, name: str, module: nn.Module, method, full: str) -> str:
    """Why the use registered as ``full`` cannot read ``name``'s effective weight ("" if it can)."""
    if method.tied_weights == "refuse":
        return f"{method.name} changes the weight's shape, so {full.rpartition('.')[0]} cannot share it"
    user_name, _, attr = full.rpartition(".")
    if attr != "weight":
        return f"{user_name} registers it as {attr!r}, not as its weight"
    why = why_not_shared(root.get_submodule(user_name), module)
    return f"{user_name}: {why}" if why else ""


def _other_rule(user: str, name: str, rule, rules: dict) -> str:
    """Why ``user``'s own rule (``rules``: layer name -> the rule that decides it) conflicts with
    ``rule``, the one deciding the owner ``name``: a tie has one mask, so both must ask the same."""
    other = rules.get(user)
    if other is None or other.index == rule.index or (other.method, other.params) == (rule.method, rule.params):
        return ""
    what = f"{other.method} with other params" if other.method == rule.method else (other.method or "null: dense")
    return (f"{user} is matched by rule {other.index} ({what}) and {name} by rule {rule.index} ({rule.method}), "
            "but the tie has one weight: match both with one rule")


def tie_decision(root: nn.Module, name: str, module: nn.Module, method, options: dict,
                 owners: dict[int, list[str]], *, dry_run: bool, rule=None,
                 rules: dict | None = None) -> tuple[str, list[str]]:
    """``(why the layer stays dense, modules to turn into tied users after the rewrite)`` for the
    matched layer ``name`` (decided by the recipe rule ``rule``; ``rules``: the rule deciding each
    other matched layer); raises ValueError where ``sparsify`` refuses (the plan lists it)."""
    tied = tied_names(root, name, module, owners)
    if not tied or method.tied_weights == "keep":
        return "", []
    mode = options.get("tied", "share")
    if mode not in ("share", "dense", "error"):  # the schema says so too, where jsonschema is installed
        raise ValueError(f"sparsify: options.tied is {mode!r}: use 'share' (the default), 'dense' or 'error'")
    names = ", ".join(tied)
    problems = [p for p in (_problem(root, name, module, method, f) for f in tied) if p]
    if mode == "dense":
        # the alternative named only where it exists: SAS cannot share (it changes the weight's shape)
        why = (f"weight tied to {names}: left dense {TIED_DENSE}; " +
               (f"'share' cannot sparsify both uses ({problems[0]})" if problems else
                "'share' sparsifies both uses with one mask"))
        if not dry_run:
            warnings.warn(f"sparsify: {name} stays dense: {why}", stacklevel=4)
        return why, []
    if rule is not None:
        problems += [p for f in tied if (p := _other_rule(f.rpartition(".")[0], name, rule, rules or {}))]
    if mode == "error":
        problems.insert(0, "options.tied is 'error'")
    if problems:
        why = (f"{name}'s weight is tied to {names} and cannot be sparsified consistently ({'; '.join(problems)}): "
               f'put "options": {{"tied": "dense"}} in the recipe to leave it dense, or untie the weights '
               "(e.g. tie_word_embeddings=False)")
        if dry_run:
            return f"sparsify refuses: {why}", []
        raise ValueError(f"sparsify: {why}")
    return "", [f.rpartition(".")[0] for f in tied]


def share_tied(root: nn.Module, owner_name: str, users: list[str]) -> None:
    """Make each module in ``users`` read the effective weight of the (rewritten) layer
    ``owner_name``: a module swap at the same path, the shared parameter kept registered."""
    if not users:
        return
    owner = root.get_submodule(owner_name)
    made: dict[int, nn.Module] = {}  # one module under several names (T5's shared embedding) stays one
    for user_name in users:
        user = root.get_submodule(user_name)
        if user is owner:  # the owner's parent is registered under a second name (MONAI's DynUNet)
            continue
        if isinstance(user, TiedUse):  # a layer called twice is rewritten once per call
            user.bind(owner, owner_name)
            continue
        if id(user) not in made:
            made[id(user)] = tied_user(user, owner, owner_name)
        set_submodule(root, user_name, made[id(user)])


def module_aliases(root: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> its qualified names`` for each module registered under several names (timm
    CoaT's ``cpe1`` is also ``serial_blocks1.0.cpe``): one layer, whichever name a graph calls.

    >>> conv = nn.Conv2d(2, 2, 1)
    >>> list(module_aliases(nn.ModuleDict({"a": conv, "b": nn.Sequential(conv)})).values())
    [['a', 'b.0']]
    """
    names: dict[int, list[str]] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(m), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def point_aliases(root: nn.Module, replaced: dict[int, nn.Module]) -> None:
    """Every name a replaced module is registered under (``replaced``: id of the old module -> the
    new one) holds the new one, so a layer registered under several names (timm CoaT's ``cpe1``)
    stays one module with one mask, in the sparse model and the finalized one. A name reached
    through an aliased parent (MONAI's DynUNet) holds the new module already.

    >>> conv, new = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
    >>> root = nn.ModuleDict({"a": conv, "b": nn.Sequential(conv)})
    >>> root["a"] = new; point_aliases(root, {id(conv): new}); root["b"][0] is new
    True
    """
    if not replaced:  # most models: no pass over the module tree
        return
    for name, m in list(root.named_modules(remove_duplicate=False)):
        if id(m) in replaced:
            set_submodule(root, name, replaced[id(m)])
