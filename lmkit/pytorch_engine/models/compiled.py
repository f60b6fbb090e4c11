"""The CPU layers compiled by Inductor and called without Dynamo.

`torch.compile` runs Dynamo's guards and wrappers on every call of a compiled function: about 90 µs here, paid
once per layer, which is 10% of a batch-8 bf16 decode step of SmolLM2-135M on two cores (21.3 against 18.7 ms
for the 30 layers). The engine calls a layer with the same kinds of tensors every time, so `CompiledFunction`
does once what Dynamo would check on every call: it traces the function with `make_fx` on fake tensors whose
dims are symbolic where the engine marked them dynamic (`torch._dynamo.maybe_mark_dynamic`, as it would for
`torch.compile`) and static elsewhere, compiles the graph with Inductor (`torch._inductor.compile`, which keeps
Inductor's on-disk cache), and from then on calls the compiled code directly.

What tracing assumed of the symbolic dims (that two batch dims are equal, that a length fits its buffer,
and also which way a size comparison went at the first call: a graph traced where two sizes were equal may
treat them as one) is kept as a compiled Python expression over the inputs' sizes and checked on every call,
in a few microseconds; inputs that fail it get a graph of their own, traced then. A size of 1 in a dynamic dim
gets a graph of its own too, as torch.compile would specialize it. The rest is left to the caller, which
promises it: every call passes the same structure of arguments, with tensors of the same dtype, device and
rank, contiguous, and equal in every static dim to the first call's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP, DimDynamic, ShapeEnv, StatelessSymbolicContext

from lmkit.pytorch_engine.models import linear

_GUARD_GLOBALS = dict(SYMPY_INTERP)


class CompiledFunction:
    """fn(*args) compiled on its first call; args are tensors, tuples of tensors, or dataclasses of tensors and
    `Linear`s (a layer's weights, flattened once per object). Returns what fn returns (a tensor or a tuple)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        # by which dynamic dims are 1: (the guards' check or None, the compiled graph), tried in order
        self.graphs: dict[tuple[bool, ...], list[tuple[Any, Callable]]] = {}
        self._kinds: list[Any] | None = None  # per argument: torch.Tensor, tuple, or the dataclass' fields
        self._dynamic: list[tuple[int, int]] = []  # (flat input, dim) marked dynamic
        self._flat_objects: dict[int, tuple[object, list[torch.Tensor]]] = {}
        self._scope: list[str] = []  # the flat inputs' names in the guards: t0, t1, ...

    def __call__(self, *args):
        if self._kinds is None:
            self._kinds = [_kind(a) for a in args]
        flat = self._flatten(args)
        if not self.graphs:
            self._dynamic = [(i, d) for i, t in enumerate(flat) for d in sorted(_marked_dynamic(t))]
            self._scope = [f"t{i}" for i in range(len(flat))]
        key = tuple(flat[i].shape[d] == 1 for i, d in self._dynamic)
        graphs = self.graphs.setdefault(key, [])
        for check, graph in graphs:
            if check is None or eval(check, _GUARD_GLOBALS, {"L": dict(zip(self._scope, flat))}):
                return graph(*flat)
        check, graph = self._compile(args, flat)
        graphs.append((check, graph))
        return graph(*flat)

    @property
    def num_graphs(self) -> int:
        return sum(len(g) for g in self.graphs.values())

    def _flatten(self, args) -> list[torch.Tensor]:
        flat: list[torch.Tensor] = []
        for a, kind in zip(args, self._kinds, strict=True):
            if kind is torch.Tensor:
                flat.append(a)
            elif kind is tuple:
                flat.extend(a)
            else:
                held = self._flat_objects.get(id(a))
                if held is None:  # the object is held so that its id is not reused
                    held = self._flat_objects[id(a)] = (a, _flatten_dataclass(a))
                flat.extend(held[1])
        return flat

    def _compile(self, args, flat: list[torch.Tensor]) -> tuple[Any, Callable]:
        if not all(t.is_contiguous() for t in flat):
            raise ValueError("CompiledFunction takes contiguous tensors only")
        spans, n = [], 0  # where each argument's tensors sit in the flat list
        for a, kind in zip(args, self._kinds):
            size = 1 if kind is torch.Tensor else len(a) if kind is tuple else len(self._flat_objects[id(a)][1])
            spans.append((n, n + size))
            n += size

        def flat_fn(*tensors):
            rebuilt = []
            for a, kind, (lo, hi) in zip(args, self._kinds, spans):
                part = tensors[lo:hi]
                rebuilt.append(part[0] if kind is torch.Tensor else tuple(part) if kind is tuple else _rebuild(a, part))
            return self.fn(*rebuilt)

        shape_env = ShapeEnv(duck_shape=False)  # equal sizes are not assumed to be the same dim
        fake_mode = FakeTensorMode(shape_env=shape_env)
        dynamic = {}
        for i, d in self._dynamic:
            dynamic.setdefault(i, set()).add(d)
        fakes = [
            fake_mode.from_tensor(
                t,
                symbolic_context=StatelessSymbolicContext(
                    dynamic_sizes=[
                        DimDynamic.DYNAMIC if d in dynamic.get(i, ()) else DimDynamic.STATIC for d in range(t.dim())
                    ]
                ),
            )
            for i, t in enumerate(flat)
        ]
        with fake_mode, linear.traced():
            graph = make_fx(flat_fn, tracing_mode="real")(*fakes)
        # Without Inductor's size and stride asserts on every buffer: 20 per layer, 0.6 ms of a batch-32 step.
        options = {"size_asserts": False}
        if any(flat[i].shape[d] != 1 for i, d in self._dynamic):
            # Inductor leaves a loop to one thread when its size hint makes the work look too small to share, and
            # the hints of symbolic sizes are the first call's: a warm-up's few tokens. Sharing every loop saves
            # ~0.6 ms of a batch-32 bf16 decode step (and a little at batch 8; a batch of one, traced with its
            # real sizes, keeps the default).
            options["cpp.min_chunk_size"] = 1
        with torch._inductor.config.patch(options):
            compiled = torch._inductor.compile(graph, fakes)
        guards = shape_env.produce_guards_expression(fakes)  # over L["t0"], L["t1"], ...
        return (None if guards is None else compile(guards, "<guards>", "eval")), compiled


def _kind(a) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.Tensor
    if isinstance(a, tuple):
        return tuple
    if dataclasses.is_dataclass(a):
        return dataclasses.fields(a)
    raise TypeError(f"CompiledFunction takes tensors, tuples of tensors and dataclasses, not {type(a).__name__}")


def _flatten_dataclass(obj) -> list[torch.Tensor]:
    flat = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, linear.Linear):
            flat += [v.weight] + ([v.bias] if v.bias is not None else [])
        elif v is not None:
            flat.append(v)
    return flat


def _rebuild(template, tensors) -> object:
    """A dataclass like `template` (a layer's weights) holding `tensors` (fake ones while tracing)."""
    values, it = {}, iter(tensors)
    for f in dataclasses.fields(template):
        v = getattr(template, f.name)
        if isinstance(v, linear.Linear):
            values[f.name] = linear.Linear.of(next(it), next(it) if v.bias is not None else None, v.packed)
        else:
            values[f.name] = None if v is None else next(it)
    return type(template)(**values)


def _marked_dynamic(t: torch.Tensor) -> set[int]:
    return set(getattr(t, "_dynamo_weak_dynamic_indices", ())) | set(getattr(t, "_dynamo_dynamic_indices", ()))
