"""Where a training step's peak memory goes: live tensor bytes by what allocated them, at the peak.

Used by ``bench/step.py --memory-breakdown``. CUDA has ``torch.cuda.memory._record_memory_history``; a
CPU has nothing like it, so this follows tensors themselves: a ``TorchDispatchMode`` sees every operator's
outputs, records each new storage's bytes under the label of what is running (the student's vision tower,
projector or LLM forward, the teacher's forward, the loss, the backward pass, clipping + the optimizer)
and drops it when the storage is freed. At the largest total it keeps a copy of what is live; afterwards
the backward pass's storages that became parameter gradients are told apart from its temporaries.

Only storages created during the step are counted (the models, the optimizer state and the batch exist
before it), i.e. what ``bench/step.py`` calls "peak in the step", without the allocator's slack.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BACKWARD, AFTER = "backward", "clipping + optimizer"


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.device.type != "meta" else 0


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created under it, by label; ``peak`` / ``at_peak`` after the step."""

    def __init__(self):
        super().__init__()
        # storage data_ptr -> (serial number, label, bytes, what made it); an address is reused once freed
        self.live: dict[int, tuple[int, str, int, str]] = {}
        self.total = self.serial = 0
        # per phase (forward, backward, clipping + optimizer): its largest total and what was live then
        self.peaks: dict[str, int] = {}
        self.at_peak: dict[str, dict[int, tuple[int, str, int, str]]] = {}
        self.labels: list[str] = ["loss"]  # work outside the labelled modules
        self.backward_seen = self.in_backward = False

    def label(self) -> str:
        if self.in_backward:
            return BACKWARD
        return AFTER if self.backward_seen else self.labels[-1]

    def backward(self, fn):
        """``torch.autograd.backward`` labelling what runs inside it."""

        def wrapped(*args, **kwargs):
            self.in_backward = self.backward_seen = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_backward = False

        return wrapped

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs, func)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int], func) -> None:
        # a view or an in-place result shares an input's storage (perhaps one from before the step)
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live or key in inputs:
            return
        label = self.label()
        self.serial += 1
        self.live[key] = (self.serial, label, n, f"{func.__name__} {tuple(t.shape)}")
        self.total += n
        weakref.finalize(st, self._free, key, n)
        phase = label if label in (BACKWARD, AFTER) else "forward"
        if self.total > self.peaks.get(phase, -1):
            self.peaks[phase], self.at_peak[phase] = self.total, dict(self.live)

    def _free(self, key: int, n: int) -> None:
        if self.live.pop(key, None) is not None:
            self.total -= n

    def hooks(self, modules: dict[str, torch.nn.Module]) -> list:
        """Forward hooks labelling what each named module allocates while it runs."""
        handles = []
        for name, module in modules.items():

            def pre(_m, _a, name=name):
                self.labels.append(name)

            def post(_m, _a, _o):
                self.labels.pop()

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        return handles

    def serials(self, tensors) -> set[int]:
        """The serial numbers of the live storages of ``tensors``."""
        return {self.live[k][0] for k in (_ptr(t) for t in tensors) if k in self.live}

    def breakdown(self, phase: str, grads: set[int]) -> dict[str, int]:
        """Bytes live at ``phase``'s peak by label; ``grads``: serial numbers of the parameter gradients."""
        out: dict[str, int] = defaultdict(int)
        for serial, label, n, _ in self.at_peak[phase].values():
            if serial in grads:
                label = "parameter gradients, " + ("backward" if label == BACKWARD else f"from the {label}")
            out[label] += n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def measure(step, batch, modules: dict[str, torch.nn.Module], params) -> dict:
    """Run ``step(batch)`` under :class:`LiveBytes`: the peak, the phase it fell in (forward, backward,
    clipping + optimizer) and, for each phase, what was live at its own peak by label and the largest tensors.

    ``params``: the trained parameters; their ``.grad`` storages are read when the optimizer step starts.
    """
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    tracker = LiveBytes()
    grads: set[int] = set()
    params = list(params)

    def note_grads(*_):
        grads.update(tracker.serials(p.grad for p in params if p.grad is not None))

    handles = [*tracker.hooks(modules), register_optimizer_step_pre_hook(note_grads)]
    backward = torch.autograd.backward  # what Tensor.backward calls
    torch.autograd.backward = tracker.backward(backward)
    try:
        with tracker:
            step(batch)
    finally:
        torch.autograd.backward = backward
        for h in handles:
            h.remove()
    phases = {}
    for phase, peak in tracker.peaks.items():
        largest = sorted(tracker.at_peak[phase].values(), key=lambda e: -e[2])[:8]
        phases[phase] = {
            "peak_bytes": peak,
            "by_label": tracker.breakdown(phase, grads),
            "largest": [(label, n, made_by) for _, label, n, made_by in largest],
        }
    top = max(phases, key=lambda k: phases[k]["peak_bytes"])
    return {"peak_bytes": phases[top]["peak_bytes"], "peak_during": top, "phases": phases}
