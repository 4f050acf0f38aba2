"""Runs an RNP model exported by `python -m export.tflite` (batch 1, CPU).

The exported `.tflite` file holds one signature per piece of the network:

- `stem`: the stem (always full width), the pooling before the first
  prunable conv and the agent's first decision;
- `conv{t}_in{p}_out{a}`: prunable conv `t` on the weight prefix for
  previous action `p` and action `a`, its pooling, and the agent's next
  decision (each signature is its own subgraph, so XNNPACK runs it; a
  single graph with `IF` branches would not be delegated);
- `tail{t}_in{p}` (bottlenecks): the block's last conv on the `p` groups
  decision `t` chose, keeping its full output, the block's sum with its
  shortcut, what follows up to the next prunable conv and the agent's
  decision there (an inverted residual's depthwise conv and projection
  run inside its expansion's `conv` signature: no `tail`);
- `skip{t}_to{u}` (skippable blocks): what follows a block whose
  decisions `t..u` the agent skipped (action `k + 1` at `t`), on the
  block's shortcut alone, and the agent's decision there;
- `head_in{a}`: the classifier on a feature map of `a` groups (`head` when
  the map feeding it keeps its full width, as in a residual network);
- `full`: the unpruned network, for latency comparisons;
- `penalty_setting`: the default run-time penalty (no inputs);
- `ties` (networks deciding once per stage): per decision, the earlier
  decision whose action it takes (-1 where the agent decides).

`TFLiteRNPRunner` is the small driver that chains them: it runs `stem`,
reads the action the agent chose (already re-priced and capped like
`RNPModel.rollout`), calls the signature of that branch, and so on to the
head. Only the chosen channel prefixes are ever computed. What a
signature returns is kept by name and fed to the later signatures that
take it (`features`, `spent`, the agent's state, a residual block's
`shortcut`), so the driver needs no description of the network.

The deciding signatures take the run-time penalty (`penalty`, float32
`[1]`, the knob of `RNPModel.set_penalty`) as an input: the runner feeds
its `penalty` (the file's `penalty_setting` until `set_penalty` changes
it), or the `penalty=` of one call.

Example:

>>> runner = TFLiteRNPRunner("/tmp/rnp_quickstart/export/rnp.tflite")
>>> logits, actions, macs = runner.run(images)          # [n, H, W, C] float32
>>> logits, actions, macs = runner.run(images, actions=[[4, 1, 2]] * len(images))
>>> runner.set_penalty(-0.5)                             # cheaper from now on
>>> logits, actions, macs = runner.run(images, penalty=-0.2)  # one call
"""

import re
import time
import warnings

import numpy as np

_CONV = re.compile(r"^conv(\d+)_in(\d+)_out(\d+)$")
_HEAD = re.compile(r"^head_in(\d+)$")
_TAIL = re.compile(r"^tail(\d+)_in(\d+)$")
_SKIP = re.compile(r"^skip(\d+)_to(\d+)$")


def _interpreter_class():
    """The LiteRT interpreter if installed, else tflite_runtime's, else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    import tensorflow as tf

    return tf.lite.Interpreter


def _direct_wrapper(interpreter):
    """The interpreter's low-level wrapper if it offers per-subgraph tensors, set and invoke; else None."""
    wrapper = getattr(interpreter, "_interpreter", None)
    needed = ("GetSubgraphIndexFromSignature", "AllocateTensors", "SetTensor", "Invoke", "tensor")
    if wrapper is None or not hasattr(interpreter, "_get_full_signature_list"):
        return None
    return wrapper if all(hasattr(wrapper, name) for name in needed) else None


class TFLiteRNPRunner:
    """Chains the signatures of an exported RNP `.tflite` file, one image at a time.

    Args:
        model_path: path of the `.tflite` file written by `export.tflite`.
        num_threads: interpreter threads (default: the runtime's choice).
        penalty: the run-time penalty fed to the agent's decisions
            (default: the file's `penalty_setting`, the exported model's
            setting); see `set_penalty`.
        zero_copy: pass each feature map from one signature to the next
            with one copy instead of the signature runner's two (default;
            also the attribute `zero_copy`). False uses only the
            interpreter's public signature runners; interpreters without
            per-subgraph tensor access always do.

    Attributes:
        groups: `k`, channel groups per prunable conv.
        num_prunable: number of decisions `T`.
        image_shape: `(H, W, C)` of one input image.
        num_classes: number of logits.
        skippable: the decisions whose action `k + 1` skips a block (sorted).
        tied_to: per tied decision, the decision whose action it takes.
        penalty: the current run-time penalty (None for a file exported
            before the penalty was an input: its penalty is frozen).
        penalty_setting: the file's default penalty (or None).

    Example:

    >>> runner = TFLiteRNPRunner("rnp.tflite")
    >>> logits, actions, macs = runner.run(x_test[:8])
    >>> runner = TFLiteRNPRunner("rnp.tflite", penalty=-0.5)  # cheaper
    """

    def __init__(self, model_path, num_threads=None, penalty=None, zero_copy=True):
        Interpreter = _interpreter_class()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            self.interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
        signatures = self.interpreter.get_signature_list()
        convs, tails, skips = {}, {}, {}
        heads = []
        for name in signatures:
            match = _CONV.match(name)
            if match:
                convs[tuple(int(v) for v in match.groups())] = name
            elif _TAIL.match(name):
                tails[tuple(int(v) for v in _TAIL.match(name).groups())] = name
            elif _SKIP.match(name):
                t, last = (int(v) for v in _SKIP.match(name).groups())
                skips[t] = (last, name)
            elif _HEAD.match(name):
                heads.append(int(_HEAD.match(name).group(1)))
        if "stem" not in signatures or not convs or not (heads or "head" in signatures):
            raise ValueError(
                f"{model_path!r} is not an RNP TFLite export (expected signatures 'stem', "
                f"'conv<t>_in<p>_out<a>', 'head_in<a>' or 'head'). Received signatures: {sorted(signatures)}"
            )
        # the first prunable conv always reads the stem's full width: its
        # signatures say k, also in an export restricted to a few branches
        self.groups = max([max(p, a) for _, p, a in convs] + heads)
        self.num_prunable = 1 + max(t for t, _, _ in convs)
        self._convs = convs
        self._tails = tails
        self._skips = skips  # skippable decision -> (the block's last decision, signature)
        self._head_full = "head" in signatures  # the head's input keeps its full width
        self._runners = {}
        self._input_names = {}
        self._signatures = {}
        self._wrapper = _direct_wrapper(self.interpreter)
        self.zero_copy = bool(zero_copy)
        stem_input = self._runner("stem").get_input_details()["images"]
        self.image_shape = tuple(int(d) for d in stem_input["shape"][1:])
        head = self._runner("head" if self._head_full else f"head_in{max(heads)}").get_output_details()["logits"]
        self.num_classes = int(head["shape"][-1])
        self.signature_keys = sorted(signatures)
        self.skippable = sorted(skips)
        self.penalty_setting = None
        if "penalty_setting" in signatures:
            self.penalty_setting = float(self._runner("penalty_setting")()["penalty_setting"][0])
        self.penalty = self.penalty_setting
        self.tied_to = {}  # decision -> the decision whose action it takes
        if "ties" in signatures:
            leaders = self._runner("ties")()["tied_to"]
            self.tied_to = {t: int(u) for t, u in enumerate(leaders) if u >= 0}
        if penalty is not None:
            self.set_penalty(penalty)

    def set_penalty(self, penalty):
        """Sets the run-time penalty of the following calls (more negative: cheaper).

        The same knob as `RNPModel.set_penalty`.

        Args:
            penalty: a finite float.

        Example:

        >>> runner.set_penalty(-0.5)
        """
        self.penalty = self._checked_penalty(penalty)

    def _checked_penalty(self, penalty):
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float, np.floating)) or not np.isfinite(penalty):
            raise ValueError(f"`penalty` must be a finite float. Received: penalty={penalty!r}")
        if self.penalty_setting is None:
            raise ValueError(
                "This file was exported with its penalty frozen (no `penalty_setting` signature): re-export it "
                f"to switch the penalty at run time. Received: penalty={penalty!r}"
            )
        return float(penalty)

    def _runner(self, key):
        if key not in self._runners:
            self._runners[key] = self.interpreter.get_signature_runner(key)
        return self._runners[key]

    def _inputs(self, key):
        if key not in self._input_names:
            self._input_names[key] = list(self._runner(key).get_input_details())
        return self._input_names[key]

    def _signature(self, key):
        """(subgraph index, {input: tensor index}, {output: tensor index}) of a signature, allocated once."""
        if key not in self._signatures:
            signature = self.interpreter._get_full_signature_list()[key]
            subgraph = self._wrapper.GetSubgraphIndexFromSignature(key)
            self._wrapper.AllocateTensors(subgraph)
            self._signatures[key] = (subgraph, dict(signature["inputs"]), dict(signature["outputs"]))
        return self._signatures[key]

    def _call(self, key, feeds):
        """Runs signature `key` on the inputs it names in `feeds`; returns its outputs by name.

        The interpreter's signature runner copies every output out of the
        interpreter and every input in, so each feature map crossing a
        signature boundary was copied twice (on VGG-16 the stem's 224x224x64
        output alone is 12.8 MB). Here inputs are copied in once and the
        outputs are numpy *views* of the signature's own tensors: the next
        signature reads them straight from there. Each signature is its own
        subgraph with its own tensors, so a view stays valid until the same
        signature runs again; callers read or copy what they keep before
        that. With `zero_copy` off, or interpreters without this low-level
        access, the signature runner is used.
        """
        if self._wrapper is None or not self.zero_copy:
            return self._runner(key)(**{name: feeds[name] for name in self._inputs(key)})
        subgraph, inputs, outputs = self._signature(key)
        for name, index in inputs.items():
            self._wrapper.SetTensor(index, feeds[name], subgraph)
        self._wrapper.Invoke(subgraph)
        return {name: self._wrapper.tensor(self.interpreter, index, subgraph) for name, index in outputs.items()}

    def _conv_key(self, t, previous, action):
        key = (t, previous, action)
        if key not in self._convs:
            key = (t, self.groups, action)  # an input that does not follow the previous action
        if key not in self._convs:
            raise ValueError(
                f"This file has no branch for layer {t} after action {previous} with action {action} (an export "
                f"restricted to some action tuples). Received: actions so far ending in {action}"
            )
        return self._convs[key]

    def run_one(self, image, actions=None, timings=None, penalty=None):
        """One image `[H, W, C]` or `[1, H, W, C]`.

        Args:
            image: float32 image.
            actions: optional `T` ints; 0 lets the agent choose, 1..k forces,
                `k + 1` at a skippable decision skips its block; a tied
                decision takes its leader's action whatever it is given.
            timings: optional dict: receives the seconds of each signature
                call under the keys "stem", "conv<t>", "tail<t>", "skip<t>"
                and "head".
            penalty: the run-time penalty of this call (default: `penalty`).

        Returns:
            `(logits [num_classes], actions int32 [T], macs float32)`; a
            skipped block's decisions are 0, as in `RNPModel.rollout`.
        """
        x = np.ascontiguousarray(np.asarray(image, np.float32).reshape(1, *self.image_shape))
        penalty = self.penalty if penalty is None else self._checked_penalty(penalty)
        knob = {} if penalty is None else {"penalty": np.full([1], penalty, np.float32)}
        clock = time.perf_counter if timings is not None else None
        start = clock and clock()
        # what the signatures returned, by name: a later one takes what it names
        # (views of each signature's tensors; each signature runs once per image)
        out = self._call("stem", dict(images=x, **knob))
        if clock:
            timings["stem"], start = clock() - start, clock()
        chosen = []
        previous = self.groups
        while len(chosen) < self.num_prunable:
            t = len(chosen)
            action = int(out["action"][0])
            if t in self.tied_to:  # the agent did not decide here: the leader's action, forced or not
                action = chosen[self.tied_to[t]]
            elif actions is not None and int(actions[t]) > 0:
                action = int(actions[t])
            if t in self._skips and action == self.groups + 1:  # the block is skipped: its decisions are 0
                last, key = self._skips[t]
                chosen += [0] * (last + 1 - t)
                steps = [(f"skip{t}", key)]
            else:
                chosen.append(action)
                steps = [(f"conv{t}", self._conv_key(t, previous, action))]
                if (t, action) in self._tails:  # a bottleneck: its block's last conv on this prefix
                    steps.append((f"tail{t}", self._tails[(t, action)]))
            # `actions` (the decisions so far) is an input only under a compute cap
            decided = np.asarray([chosen + [0] * (self.num_prunable - len(chosen))], np.int32)
            for label, key in steps:
                out = dict(out, **self._call(key, dict(out, actions=decided, **knob)))
                if clock:
                    timings[label], start = clock() - start, clock()
            previous = chosen[-1]
        head = self._call("head" if self._head_full else f"head_in{previous}", out)
        if clock:
            timings["head"] = clock() - start
        return np.array(head["logits"][0]), np.asarray(chosen, np.int32), np.float32(head["macs"][0])

    def run(self, images, actions=None, penalty=None):
        """A batch of images, one at a time (batch 1 is what this format is for).

        Args:
            images: float32 `[n, H, W, C]` (or one `[H, W, C]` image).
            actions: optional int `[n, T]`: 0 lets the agent choose, 1..k forces
                that many groups, `k + 1` at a skippable decision skips its block.
            penalty: the run-time penalty of this call (default: `penalty`,
                see `set_penalty`).

        Returns:
            `(logits float32 [n, classes], actions int32 [n, T], macs float32 [n])`.
        """
        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"Inputs must be float images [n, {', '.join(map(str, self.image_shape))}]. "
                f"Received: shape={images.shape}"
            )
        if actions is not None:
            actions = np.asarray(actions)
            top = np.full(self.num_prunable, self.groups)
            top[self.skippable] = self.groups + 1
            if actions.shape != (len(images), self.num_prunable) or (actions < 0).any() or (actions > top).any():
                raise ValueError(
                    f"`actions` must be ints in 0..{self.groups} ({self.groups + 1}: skip, at the skippable "
                    f"decisions {self.skippable}) of shape [{len(images)}, {self.num_prunable}]. "
                    f"Received: shape={actions.shape}, max={actions.max() if actions.size else None}"
                )
        penalty = None if penalty is None else self._checked_penalty(penalty)
        logits = np.zeros((len(images), self.num_classes), np.float32)
        chosen = np.zeros((len(images), self.num_prunable), np.int32)
        macs = np.zeros(len(images), np.float32)
        for i, image in enumerate(images):
            logits[i], chosen[i], macs[i] = self.run_one(image, None if actions is None else actions[i], penalty=penalty)
        return logits, chosen, macs

    def run_full(self, images):
        """Logits of the unpruned network (the `full` signature), one image at a time."""
        images = np.asarray(images, np.float32).reshape(-1, *self.image_shape)
        full = self._runner("full")
        return np.stack([full(images=images[i : i + 1])["logits"][0] for i in range(len(images))])
