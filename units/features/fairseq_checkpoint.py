"""Load fairseq HuBERT / wav2vec 2.0 checkpoints into transformers models, without fairseq.

fairseq cannot be installed next to this project, and a fairseq ``.pt`` is a pickle: loading
it the usual way (``torch.load(weights_only=False)`` + fairseq's model classes) runs whatever
code the file names. This module reads the file with ``torch.load(weights_only=True)`` and an
explicit allow-list (:data:`SAFE_GLOBALS`), rebuilds the model's configuration from the plain
``cfg`` dict (or the ``args`` ``argparse.Namespace`` of older checkpoints), and copies the
weights key by key into :class:`transformers.HubertModel` or
:class:`transformers.Wav2Vec2Model` (DESIGN.md, invariant 6). Nothing is fetched from a hub.

The key mapping is the one of transformers' conversion scripts
(``convert_{hubert,wav2vec2}_original_pytorch_checkpoint_to_pytorch.py``), written as exact
patterns instead of substring matches, so that a key that has no place in the model is an
error instead of being dropped. Every parameter of the transformers model must be filled.

Layer outputs (checked by the tests against a re-implementation of fairseq's forward pass):
with transformers 5, ``model(x, output_hidden_states=True).hidden_states[i]`` (``i >= 1``) is
the output of transformer block ``i``, which is what fairseq's
``extract_features(output_layer=i)`` returns; ``last_hidden_state`` of a ``layer_norm_first``
model (HuBERT / wav2vec 2.0 large) also has the encoder's final layer norm, as fairseq's
``extract_features()`` without a layer. (transformers 4 put that final layer norm on the last
entry of ``hidden_states`` too.)

Example:
    >>> fm = load_fairseq("hubert_base_ls960.pt")  # doctest: +SKIP
    >>> fm.architecture, fm.normalize_waveform, fm.config.num_hidden_layers  # doctest: +SKIP
    ('hubert', False, 12)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from units.features.extractor import FeatureSpec

logger = logging.getLogger(__name__)

ARCHITECTURES = ("hubert", "wav2vec2")

# fairseq model names (cfg.model._name / args.arch) -> (architecture, fine-tuned).
_MODEL_NAMES = {
    "hubert": ("hubert", False),
    "wav2vec2": ("wav2vec2", False),
    "hubert_ctc": ("hubert", True),
    "wav2vec_ctc": ("wav2vec2", True),
}
# Prefix of the pre-trained model's keys inside a CTC fine-tuned checkpoint.
_FINETUNED_PREFIX = "w2v_encoder.w2v_model."

# fairseq's own defaults (fairseq/models/wav2vec/wav2vec2.py::Wav2Vec2Config and
# fairseq/models/hubert/hubert.py::HubertConfig), used where a checkpoint lacks a field.
_COMMON_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "dropout_features": 0.0,
    "final_dim": 0,
    "layer_norm_first": False,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_bias": False,
    "logit_temp": 0.1,
    "target_glu": False,
    "feature_grad_mult": 1.0,
    "mask_length": 10,
    "mask_prob": 0.65,
    "mask_channel_length": 10,
    "mask_channel_prob": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "pos_conv_depth": 1,
    "crop_seq_to_multiple": 1,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "hubert": dict(
        _COMMON_DEFAULTS,
        conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    ),
    "wav2vec2": dict(
        _COMMON_DEFAULTS,
        quantize_targets=False,
        quantize_input=False,
        latent_vars=320,
        latent_groups=2,
        latent_dim=0,
        num_negatives=100,
    ),
}

# fairseq activation names (fairseq/utils.py::get_activation_fn) -> transformers ACT2FN names.
_ACTIVATIONS = {
    "gelu": "gelu",  # exact (erf) in both
    "gelu_accurate": "gelu_new",  # tanh approximation, same formula in both
    "gelu_fast": "gelu_new",
    "relu": "relu",
    "relu_squared": "relu2",
    "tanh": "tanh",
    "linear": "linear",
    "swish": "silu",  # fairseq's swish is torch.nn.SiLU
}

_MAX_CONV_LAYERS = 64
_MAX_SPEC_CHARS = 4096


class CheckpointError(ValueError):
    """A fairseq checkpoint that cannot be loaded: unreadable, unsupported or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that needs globals outside the allow-list to be unpickled.

    Attributes:
        unsafe_globals: The fully qualified names the unpickler refused.
    """

    def __init__(self, message: str, unsafe_globals: list[str]):
        super().__init__(message)
        self.unsafe_globals = unsafe_globals


@dataclasses.dataclass(frozen=True, eq=False)
class FairseqModel:
    """A fairseq checkpoint loaded into a transformers model, with what a caller must know.

    Attributes:
        model: ``HubertModel`` or ``Wav2Vec2Model``, in eval mode, on the requested device.
        architecture: ``"hubert"`` or ``"wav2vec2"``.
        normalize_waveform: fairseq's task ``normalize`` flag: the waveform must be
            layer-normalised (zero mean, unit variance per utterance) before the model.
        path: The checkpoint path as given.
        sha256: sha256 of the checkpoint file.
        config: The transformers config the model was built from.
        ignored_keys: Checkpoint keys deliberately not loaded (pre-training or CTC heads).

    Example:
        >>> fm = load_fairseq("wav2vec_small.pt")  # doctest: +SKIP
        >>> out = fm.model(torch.zeros(1, 16000), output_hidden_states=True)  # doctest: +SKIP
        >>> len(out.hidden_states), out.last_hidden_state.shape  # doctest: +SKIP
        (13, torch.Size([1, 49, 768]))
    """

    model: torch.nn.Module
    architecture: str
    normalize_waveform: bool
    path: str
    sha256: str
    config: Any
    ignored_keys: tuple[str, ...] = ()


# --------------------------------------------------------------------------- safe loading


class FairseqDictionaryPlaceholder:
    """Inert stand-in for ``fairseq.data.dictionary.Dictionary`` when unpickling.

    HuBERT pre-training checkpoints keep their label dictionaries in ``task_state``. The
    weights-only unpickler builds this class instead of fairseq's: ``__new__`` is object's
    and ``__setstate__`` only stores the (plain) pickled state, so no fairseq code runs.
    """

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return "FairseqDictionaryPlaceholder()"


def _numpy_safe_globals() -> list:
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    out: list = [np.dtype, np.ndarray]
    # Checkpoints written under numpy 1.x name numpy.core.*, under 2.x numpy._core.*.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((multiarray.scalar, f"{module}.scalar"))
        out.append((multiarray._reconstruct, f"{module}._reconstruct"))
    # Unpickling a dtype sets its state, which the unpickler allows only on listed types:
    # numeric and bool dtypes only (no object arrays).
    out.extend(dict.fromkeys(type(np.dtype(code)) for code in "?bhilqBHILQefdgFD"))
    return out


#: What ``torch.load(weights_only=True)`` may build besides tensors and plain containers:
#: ``argparse.Namespace`` (``args`` of older checkpoints), numpy scalars / numeric arrays /
#: dtypes (optimizer and metrics state), and an inert placeholder for fairseq's Dictionary.
SAFE_GLOBALS: list = [
    argparse.Namespace,
    *_numpy_safe_globals(),
    (FairseqDictionaryPlaceholder, "fairseq.data.dictionary.Dictionary"),
]

_CONVERT_HINT = (
    "Convert it once, in an environment with fairseq and only if you trust the file: "
    "state = torch.load(path, map_location='cpu', weights_only=False); "
    "cfg = state['cfg'] (if it is an omegaconf DictConfig: "
    "omegaconf.OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)); "
    "torch.save({'model': state['model'], 'cfg': cfg}, converted_path). "
    "For an old checkpoint with 'args', save {'model': state['model'], 'args': state['args']}."
)

_GLOBAL_NAME = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)|<class '([A-Za-z_][\w.]*)'>")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks."""
    from shards.core import storage

    digest = hashlib.sha256()
    with storage.open_input(os.fspath(path)) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _refused_globals(path: str | os.PathLike, exc: BaseException) -> list[str]:
    """The globals a weights-only load refused: from the pickle itself, else the message."""
    names: list[str] = []
    try:
        # Static scan of a zip checkpoint's pickle (nothing is imported or run).
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) or unreadable file: fall back to the message
        pass
    if not names:
        for match in _GLOBAL_NAME.finditer(str(exc)):
            name = match.group(1) or match.group(2)
            if name not in names:
                names.append(name)
    return names


_WEIGHTS_ONLY_REASON = re.compile(
    r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the|$)", re.S
)


def _reason(exc: BaseException) -> str:
    """The useful part of a load error (torch's weights-only messages have a long preamble)."""
    text = str(exc)
    match = _WEIGHTS_ONLY_REASON.search(text)
    if match:
        return " ".join(match.group(1).split())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else repr(exc)}"


def _unreadable(path: str | os.PathLike, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{os.fspath(path)} ({os.path.getsize(path)} bytes): not a readable torch checkpoint "
        f"(corrupt or truncated?): {_reason(exc)}"
    )


def load_checkpoint_state(path: str | os.PathLike, *, mmap: bool = False) -> dict:
    """Unpickle a fairseq checkpoint with ``weights_only=True`` and :data:`SAFE_GLOBALS`.

    Args:
        path: The checkpoint.
        mmap: Map the tensors' storage instead of reading it (for reading the config of a
            large checkpoint: its pickle is read, its weights are not). Only the zip format
            of ``torch.save`` can be mapped; a legacy file is read whole. The unpickler is
            the same weights-only one either way.

    Raises:
        FileNotFoundError: No such file.
        UnsafeCheckpointError: The file needs globals outside the allow-list (they are named).
        CheckpointError: The file is not a readable torch checkpoint (corrupt, truncated).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fairseq checkpoint not found: {os.fspath(path)}")
    mmap = mmap and zipfile.is_zipfile(path)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            refused = _refused_globals(path, exc)
            if refused:
                raise UnsafeCheckpointError(
                    f"{os.fspath(path)}: refusing to unpickle {', '.join(refused)}: not in the "
                    "allow-list of fairseq_checkpoint.SAFE_GLOBALS (weights-only loading; "
                    f"arbitrary pickled code is never run). {_CONVERT_HINT}",
                    refused,
                ) from None
            raise _unreadable(path, exc) from exc
        except Exception as exc:
            raise _unreadable(path, exc) from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{os.fspath(path)}: not a fairseq checkpoint: holds a {type(state).__name__}, "
            "expected a dict with 'model' and 'cfg' (or 'args')"
        )
    return dict(state)


# --------------------------------------------------------------------------- configuration


def parse_conv_feature_layers(spec: str | list | tuple) -> list[tuple[int, int, int]]:
    """Parse fairseq's ``conv_feature_layers`` without ``eval``.

    Accepts list literals of ``(dim, kernel, stride)`` int tuples combined with ``+`` and
    ``* int`` only, e.g. ``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``.

    Example:
        >>> parse_conv_feature_layers("[(512,10,5)] + [(512,2,2)] * 2")
        [(512, 10, 5), (512, 2, 2), (512, 2, 2)]

    Raises:
        CheckpointError: Anything else (names, calls, attributes, huge repetitions...).
    """
    if isinstance(spec, (list, tuple)):
        layers = [tuple(layer) for layer in spec]
    else:
        if not isinstance(spec, str) or len(spec) > _MAX_SPEC_CHARS:
            raise CheckpointError(f"conv_feature_layers must be a short string, got {spec!r:.80}")
        try:
            tree = ast.parse(spec.strip(), mode="eval")
        except SyntaxError as exc:
            raise CheckpointError(f"conv_feature_layers {spec!r}: not a list literal") from exc
        layers = _literal(tree.body, spec)
        if not isinstance(layers, list):
            raise CheckpointError(f"conv_feature_layers {spec!r}: not a list")
    if not layers:
        raise CheckpointError(f"conv_feature_layers {spec!r}: no layers")
    for layer in layers:
        if (
            not isinstance(layer, tuple)
            or len(layer) != 3
            or not all(type(v) is int and v > 0 for v in layer)
        ):
            raise CheckpointError(
                f"conv_feature_layers {spec!r}: each layer must be (dim, kernel, stride) "
                f"positive ints, got {layer!r}"
            )
    return [tuple(layer) for layer in layers]


def _literal(node: ast.AST, spec: str) -> Any:
    """Evaluate int constants, tuples, lists, ``list + list`` and ``list * int``."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e, spec) for e in node.elts)
    if isinstance(node, ast.List):
        return [_literal(e, spec) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _literal(node.left, spec), _literal(node.right, spec)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            result = left + right
        elif isinstance(node.op, ast.Mult) and isinstance(left, list) and type(right) is int:
            result = left * right if 0 <= right <= _MAX_CONV_LAYERS else None
        elif isinstance(node.op, ast.Mult) and type(left) is int and isinstance(right, list):
            result = right * left if 0 <= left <= _MAX_CONV_LAYERS else None
        else:
            result = None
        if result is None or len(result) > _MAX_CONV_LAYERS:
            raise CheckpointError(
                f"conv_feature_layers {spec!r}: unsupported or oversized expression "
                f"{ast.unparse(node)!r:.80}"
            )
        return result
    raise CheckpointError(
        f"conv_feature_layers {spec!r}: only list literals of int tuples with + and * are "
        f"accepted, not {ast.unparse(node)!r:.80}"
    )


def _as_dict(obj: Any, what: str) -> dict:
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, Mapping):
        return dict(obj)
    raise CheckpointError(f"{what} is a {type(obj).__name__}, expected a dict or a Namespace")


def _read_fairseq_config(state: Mapping) -> tuple[str, bool, dict, bool]:
    """(architecture, fine_tuned, model fields, normalize) from ``cfg`` or ``args``."""
    cfg, args = state.get("cfg"), state.get("args")
    if isinstance(cfg, Mapping) and cfg.get("model") is not None:
        model_cfg = _as_dict(cfg["model"], "cfg['model']")
        task_cfg = _as_dict(cfg.get("task") or {}, "cfg['task']")
        name = model_cfg.get("_name") or model_cfg.get("arch")  # arch: a Namespace in cfg
    elif isinstance(args, argparse.Namespace):
        model_cfg = task_cfg = dict(vars(args))
        name = model_cfg.get("arch")
    else:
        raise CheckpointError(
            "no model configuration: expected cfg['model'] (a dict) or args (a Namespace); "
            f"top-level keys are {sorted(state)}"
        )
    if name not in _MODEL_NAMES:
        raise CheckpointError(
            f"unsupported fairseq model {name!r}: expected one of {sorted(_MODEL_NAMES)} "
            "(HuBERT or wav2vec 2.0, pre-trained or CTC fine-tuned)"
        )
    architecture, fine_tuned = _MODEL_NAMES[name]
    normalize = task_cfg.get("normalize")
    if fine_tuned:
        w2v_args = model_cfg.get("w2v_args")
        if w2v_args is None:
            raise CheckpointError(
                f"fine-tuned {name!r} checkpoint does not embed its pre-training config "
                "(w2v_args is empty); load the pre-trained checkpoint instead"
            )
        if isinstance(w2v_args, argparse.Namespace):
            inner_model = inner_task = dict(vars(w2v_args))
            inner_name = inner_model.get("arch")
        else:
            w2v_args = _as_dict(w2v_args, "w2v_args")
            inner_model = _as_dict(w2v_args.get("model") or {}, "w2v_args['model']")
            inner_task = _as_dict(w2v_args.get("task") or {}, "w2v_args['task']")
            inner_name = inner_model.get("_name")
        if _MODEL_NAMES.get(inner_name) != (architecture, False):
            raise CheckpointError(
                f"fine-tuned {name!r} checkpoint wraps an unsupported model {inner_name!r}"
            )
        model_cfg = inner_model
        if normalize is None:
            normalize = inner_task.get("normalize")
    return architecture, fine_tuned, model_cfg, bool(normalize)


def _field(model_cfg: Mapping, architecture: str, key: str) -> Any:
    value = model_cfg.get(key)
    return _DEFAULTS[architecture][key] if value is None else value


def _transformers_config(architecture: str, model_cfg: Mapping):
    """The transformers config equivalent to a fairseq model config (raises on what differs)."""
    from transformers import HubertConfig, Wav2Vec2Config

    def get(key: str) -> Any:
        return _field(model_cfg, architecture, key)

    mode = get("extractor_mode")
    if mode not in ("default", "layer_norm"):
        raise CheckpointError(f"unsupported extractor_mode {mode!r}")
    if get("layer_type") != "transformer":
        raise CheckpointError(
            f"unsupported layer_type {get('layer_type')!r}: only 'transformer' maps onto "
            f"transformers' {architecture} model"
        )
    if int(get("pos_conv_depth")) != 1:
        raise CheckpointError(f"unsupported pos_conv_depth {get('pos_conv_depth')} (only 1)")
    if architecture == "wav2vec2" and get("quantize_input"):
        raise CheckpointError("unsupported quantize_input=True (quantised encoder inputs)")
    activation = get("activation_fn")
    if activation not in _ACTIVATIONS:
        raise CheckpointError(f"unsupported activation_fn {activation!r}")
    if int(get("crop_seq_to_multiple")) > 1:
        logger.warning(
            "crop_seq_to_multiple=%s: fairseq crops the conv features to a multiple of it, "
            "transformers does not",
            get("crop_seq_to_multiple"),
        )
    conv = parse_conv_feature_layers(get("conv_feature_layers"))
    hidden, heads = int(get("encoder_embed_dim")), int(get("encoder_attention_heads"))
    if hidden % heads:
        raise CheckpointError(f"encoder_embed_dim={hidden} is not a multiple of heads={heads}")
    final_dim = int(get("final_dim")) or hidden
    kwargs = dict(
        hidden_size=hidden,
        num_hidden_layers=int(get("encoder_layers")),
        num_attention_heads=heads,
        intermediate_size=int(get("encoder_ffn_embed_dim")),
        hidden_act=_ACTIVATIONS[activation],
        hidden_dropout=float(get("dropout")),
        attention_dropout=float(get("attention_dropout")),
        activation_dropout=float(get("activation_dropout")),
        feat_proj_dropout=float(get("dropout_input")),
        layerdrop=float(get("encoder_layerdrop")),
        layer_norm_eps=1e-5,  # fairseq LayerNorm / Fp32GroupNorm
        feat_extract_norm="group" if mode == "default" else "layer",
        feat_extract_activation="gelu",  # fairseq's conv blocks and pos_conv use nn.GELU()
        conv_dim=tuple(d for d, _, _ in conv),
        conv_kernel=tuple(k for _, k, _ in conv),
        conv_stride=tuple(s for _, _, s in conv),
        conv_bias=bool(get("conv_bias")),
        num_conv_pos_embeddings=int(get("conv_pos")),
        num_conv_pos_embedding_groups=int(get("conv_pos_groups")),
        do_stable_layer_norm=bool(get("layer_norm_first")),
        apply_spec_augment=True,
        mask_time_prob=float(get("mask_prob")),
        mask_time_length=int(get("mask_length")),
        mask_feature_prob=float(get("mask_channel_prob")),
        mask_feature_length=int(get("mask_channel_length")),
    )
    if architecture == "hubert":
        return HubertConfig(**kwargs, feat_proj_layer_norm=True, conv_pos_batch_norm=False)
    latent_dim = int(get("latent_dim"))
    return Wav2Vec2Config(
        **kwargs,
        num_codevectors_per_group=int(get("latent_vars")),
        num_codevector_groups=int(get("latent_groups")),
        codevector_dim=latent_dim or final_dim,
        proj_codevector_dim=final_dim,
        num_negatives=int(get("num_negatives")),
        contrastive_logits_temperature=float(get("logit_temp")),
    )


# --------------------------------------------------------------------------- weights

# Keys of modules used only in pre-training (or the CTC head of a fine-tuned model).
_IGNORED = re.compile(
    r"label_embs_concat|final_proj\.\w+|target_glu\.[\w.]+|quantizer\.[\w.]+"
    r"|project_q\.\w+|w2v_encoder\.proj\.\w+"
)
_POS_G, _POS_V = "<pos_conv weight_g>", "<pos_conv weight_v>"
_COMMON_RULES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"mask_emb", "masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.(weight_g|parametrizations\.weight\.original0)", _POS_G),
    (r"encoder\.pos_conv\.0\.(weight_v|parametrizations\.weight\.original1)", _POS_V),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(k|v|q|out)_proj\.(weight|bias)",
     r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)",
     r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)",
     r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)",
     r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
     r"encoder.layers.\1.final_layer_norm.\2"),
]  # fmt: skip
_MODE_RULES = {
    # "default": one GroupNorm (module index 2) in the first conv block only.
    "group": [(r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)",
               r"feature_extractor.conv_layers.0.layer_norm.\1")],
    # "layer_norm": Sequential(TransposeLast, LayerNorm, TransposeLast) at index 2 of each block.
    "layer": [(r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)",
               r"feature_extractor.conv_layers.\1.layer_norm.\2")],
}  # fmt: skip


def _compile_rules(feat_extract_norm: str) -> list[tuple[re.Pattern, str]]:
    rules = _COMMON_RULES + _MODE_RULES[feat_extract_norm]
    return [(re.compile(pattern), target) for pattern, target in rules]


def map_state_dict(
    fairseq_state: Mapping[str, torch.Tensor], model: torch.nn.Module, fine_tuned: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a fairseq state dict onto ``model``'s parameter names, checking every key.

    Returns:
        (state dict for ``model.load_state_dict(strict=True)``, ignored fairseq keys).

    Raises:
        CheckpointError: A key with no place in the model, a shape mismatch, or a model
            parameter that the checkpoint does not fill; the message names the keys.
    """
    config = model.config
    targets = model.state_dict()
    pos_names = {
        _POS_G: ("encoder.pos_conv_embed.conv.parametrizations.weight.original0",
                 "encoder.pos_conv_embed.conv.weight_g"),
        _POS_V: ("encoder.pos_conv_embed.conv.parametrizations.weight.original1",
                 "encoder.pos_conv_embed.conv.weight_v"),
    }  # fmt: skip
    pos_names = {k: next((n for n in v if n in targets), v[0]) for k, v in pos_names.items()}
    rules = _compile_rules(config.feat_extract_norm)

    mapped: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in fairseq_state.items():
        name = key
        if fine_tuned:
            if not key.startswith(_FINETUNED_PREFIX):
                (ignored if _IGNORED.fullmatch(key) else unexpected).append(key)
                continue
            name = key[len(_FINETUNED_PREFIX) :]
        if _IGNORED.fullmatch(name):
            ignored.append(key)
            continue
        target = None
        for pattern, replacement in rules:
            if pattern.fullmatch(name):
                target = pattern.sub(replacement, name)
                break
        target = pos_names.get(target, target)
        if target == "masked_spec_embed" and target not in targets:
            ignored.append(key)  # transformers has no mask embedding when masking is off
            continue
        if target is None or target not in targets:
            unexpected.append(key)
            continue
        if target in mapped:
            raise CheckpointError(f"fairseq keys {source[target]} and {key} both map to {target}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"fairseq key {key} holds a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(targets[target].shape):
            mismatched.append(
                f"{key} {tuple(value.shape)} -> {target} {tuple(targets[target].shape)}"
            )
            continue
        mapped[target] = value.to(dtype=targets[target].dtype)
        source[target] = key

    model_name = type(model).__name__
    if unexpected:
        raise CheckpointError(
            f"unexpected key(s) in the fairseq checkpoint, with no place in {model_name}: "
            f"{', '.join(unexpected)}"
        )
    if mismatched:
        raise CheckpointError(f"shape mismatch(es) for {model_name}: {'; '.join(mismatched)}")

    proj_w, proj_b = "feature_projection.projection.weight", "feature_projection.projection.bias"
    if proj_w not in mapped and proj_b not in mapped and config.conv_dim[-1] == config.hidden_size:
        # fairseq builds no post_extract_proj when the conv and encoder widths agree;
        # transformers always has a projection: make it the identity.
        mapped[proj_w] = torch.eye(config.hidden_size, dtype=targets[proj_w].dtype)
        mapped[proj_b] = torch.zeros(config.hidden_size, dtype=targets[proj_b].dtype)
        logger.debug("no post_extract_proj in the checkpoint: identity projection")

    missing = [name for name in targets if name not in mapped]
    if missing:
        raise CheckpointError(
            f"the fairseq checkpoint does not fill {model_name} parameter(s): {', '.join(missing)}"
        )
    return mapped, ignored


# --------------------------------------------------------------------------- entry points


def _checkpoint_config(state: Mapping, path_str: str) -> tuple[Mapping, str, bool, Any, bool]:
    """``(weights, architecture, fine_tuned, transformers config, normalize)`` of a loaded
    checkpoint state; the config is checked, the weights are not looked at.

    Raises:
        CheckpointError: No ``model`` state dict, or a configuration that is missing,
            unsupported or inconsistent (the message starts with the path).
    """
    weights = state.get("model")
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path_str}: no 'model' state dict; top-level keys {sorted(state)}")
    try:
        architecture, fine_tuned, model_cfg, normalize = _read_fairseq_config(state)
        config = _transformers_config(architecture, model_cfg)
    except CheckpointError as exc:
        raise CheckpointError(f"{path_str}: {exc}") from None
    return weights, architecture, fine_tuned, config, normalize


def describe_fairseq(path: str | os.PathLike, layer: int) -> FeatureSpec:
    """The :class:`~units.features.extractor.FeatureSpec` of block ``layer`` of a fairseq
    checkpoint, from its ``cfg`` (or ``args``) and its sha256: what the extractor of
    ``load_fairseq(path)`` reports, without building the model.

    The checkpoint is unpickled as :func:`load_fairseq` does (weights-only, the same
    allow-list), with its tensors memory-mapped, so they are not read into memory.

    Raises:
        FileNotFoundError: No such file.
        UnsafeCheckpointError: The file needs globals outside :data:`SAFE_GLOBALS`.
        CheckpointError: Corrupt file, unknown architecture or unsupported option.
        ValueError: A layer out of range (see :func:`units.features.ssl.layer_spec`).
    """
    from units.features.ssl import describe_config

    path_str = os.fspath(path)
    state = load_checkpoint_state(path, mmap=True)
    _, _, _, config, normalize = _checkpoint_config(state, path_str)
    del state  # Lets the mapping go.
    spec = describe_config(
        config,
        layer,
        source="fairseq",
        path=path_str,
        sha256=None,
        normalize_waveform=normalize,
    )
    # Hashed last, so a bad layer fails without reading the whole file.
    return dataclasses.replace(spec, checkpoint_sha256=sha256_file(path))


def load_fairseq(path: str | os.PathLike, device: str | torch.device = "cpu") -> FairseqModel:
    """Load a fairseq HuBERT or wav2vec 2.0 checkpoint into a transformers model, safely.

    Args:
        path: A local fairseq ``.pt`` (pre-trained, or CTC fine-tuned: its encoder is taken).
        device: Where the model goes after loading.

    Returns:
        A :class:`FairseqModel` whose ``model`` is in eval mode.

    Raises:
        FileNotFoundError: No such file.
        UnsafeCheckpointError: The file needs globals outside :data:`SAFE_GLOBALS`.
        CheckpointError: Corrupt file, unknown architecture, unsupported option, or a weight
            that is missing, unexpected or of the wrong shape (named in the message).
    """
    path_str = os.fspath(path)
    state = load_checkpoint_state(path)
    weights, architecture, fine_tuned, config, normalize = _checkpoint_config(state, path_str)

    from transformers import HubertModel, Wav2Vec2Model

    model = (HubertModel if architecture == "hubert" else Wav2Vec2Model)(config)
    try:
        mapped, ignored = map_state_dict(weights, model, fine_tuned=fine_tuned)
    except CheckpointError as exc:
        raise CheckpointError(f"{path_str}: {exc}") from None
    model.load_state_dict(mapped, strict=True)
    if ignored:
        logger.debug("%s: ignored %d pre-training/head keys: %s", path_str, len(ignored), ignored)
    model.eval().to(device)
    return FairseqModel(
        model=model,
        architecture=architecture,
        normalize_waveform=normalize,
        path=path_str,
        sha256=sha256_file(path),
        config=config,
        ignored_keys=tuple(ignored),
    )
