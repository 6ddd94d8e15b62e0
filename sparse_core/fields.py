"""How a config field is declared, once: its default, its help and the decisions the rest of the code reads.

Every field of the config dataclasses (``sparse_core/config.py``) is a ``knob``: its default, one line of help
(``python -m sparse_core --help`` prints it) and a ``Role`` that decides three things, each of which some part of
the code reads as a list of keys derived here:

- ``identity``: whether the field is part of the run's identity (``config.run_key``, the export header); a field
  that never changes a result (where the run executes, a test hook) is not;
- ``packable``: whether copies of one pack may differ in it (``packed.PACKABLE``): it changes numbers, not the
  computation graph or the plan's shape;
- ``post_fork``: whether it is read only from the first pruning step on (``prefix.POST_FORK``), so that runs
  differing in it share their pre-training (``tests/test_prefix.py`` checks each such field bitwise).

A knob may also name its choices (checked when the config is built) or the registry its value is looked up in
(checked by ``checks.validate_names``). A field declared without a role is an error when the config module is
imported (``require_decided``): a new setting cannot slip into shared pre-training or a pack unexamined.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Role:
    identity: bool  # part of the run's identity: a change in it may change the result
    packable: bool  # copies of one pack may differ in it
    post_fork: bool  # read only from the first pruning step on


PRE = Role(identity=True, packable=False, post_fork=False)  # shapes the run (graph, plan or numbers) from the start
POST = Role(identity=True, packable=False, post_fork=True)  # acts from the first pruning step on
PACK = Role(identity=True, packable=True, post_fork=False)  # a number that copies of one pack may differ in
PLACE = Role(identity=False, packable=False, post_fork=False)  # where and how the run executes, never its result


def knob(default: Any, help: str, role: Role, *, choices: tuple = (), registry: str | None = None):
    """A config field: ``default``, its ``help``, its ``role``; ``choices`` (checked by ``check_choices``) or the
    name of the ``registry`` (``sparse_core.registry.REGISTRIES``) that its value must be in."""
    if not isinstance(role, Role):
        raise TypeError(f"knob {help[:40]!r}: role must be a Role (PRE, POST, PACK, PLACE or Role(...)), "
                        f"not {role!r}")
    meta = {"help": help, "role": role, "choices": tuple(choices), "registry": registry}
    return dataclasses.field(default=default, metadata=meta)


def flat_fields(root: type) -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every leaf field of the dataclass ``root``, sections expanded, in declaration order
    (the order of ``config.to_flat``)."""
    for f in dataclasses.fields(root):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            for g in dataclasses.fields(f.default_factory):
                yield f"{f.name}.{g.name}", g
        else:
            yield f.name, f


def require_decided(root: type) -> None:
    """Raise if a leaf field of ``root`` is not a ``knob`` with a role and help: one line naming the fields."""
    missing = [key for key, f in flat_fields(root)
               if not isinstance(f.metadata.get("role"), Role) or not f.metadata.get("help")]
    if missing:
        raise TypeError(f"config field(s) {', '.join(missing)} declare no role or help: declare each with "
                        f"knob(default, help, role) and decide its role (PRE, POST, PACK, PLACE or Role(...))")


def keys_where(root: type, wanted: Callable[[Role], bool]) -> tuple[str, ...]:
    """The dotted keys of ``root`` whose role passes ``wanted``, in declaration order."""
    return tuple(key for key, f in flat_fields(root) if wanted(f.metadata["role"]))


def registry_keys(root: type) -> dict[str, str]:
    """{dotted key: registry name} of the fields whose value names a registry entry."""
    return {key: f.metadata["registry"] for key, f in flat_fields(root) if f.metadata.get("registry")}


def check_choices(section: str, value: Any) -> None:
    """Every field of the dataclass instance ``value`` (the config section ``section``) with named choices holds
    one of them; else one line naming the key and the choices."""
    for f in dataclasses.fields(value):
        choices = f.metadata.get("choices")
        if choices and getattr(value, f.name) not in choices:
            raise ValueError(f"{section}.{f.name}={getattr(value, f.name)!r} is not valid; choose one of "
                             f"{', '.join(map(str, choices))}")
