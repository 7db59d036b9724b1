"""Transformer-layer features from HuBERT, wav2vec 2.0, WavLM and data2vec-audio models.

Loading and extraction are kept apart: :func:`load_hf` turns a local Hugging Face model
directory into an :class:`SSLModel` bundle (``units/features/fairseq_checkpoint.py`` makes the same
bundle from a fairseq ``.pt``, through :func:`from_fairseq`), and :class:`SSLExtractor` runs
any bundle, batched, on CPU or CUDA. What an extractor computes, its
:class:`~units.features.extractor.FeatureSpec`, follows from the model's configuration and
the layer alone: :func:`describe_hf` (and :func:`describe_config`, for a fairseq checkpoint's
configuration) gives it without building the model, through the same code that the bundle
and the extractor use (:func:`layer_spec`), so the two cannot disagree.

Which layer. ``layer=L`` is the output of transformer block ``L`` counted from 1, exactly
what fairseq's ``model.extract_features(wav, output_layer=L)`` returns: fairseq's
``TransformerEncoder.extract_features`` breaks out of its block loop after block ``L``
(``tgt_layer = L - 1``) and applies the encoder's final layer norm only when no layer is
asked for (``if self.layer_norm_first and layer is None``). So:

- post-LN ("base") encoders: the encoder layer norm runs before the blocks, and block
  ``L``'s output is the feature (transformers' ``hidden_states[L]``);
- pre-LN ("large", ``layer_norm_first`` / ``do_stable_layer_norm``) encoders: block ``L``'s
  output *without* the final encoder layer norm, even for the last block. transformers'
  ``last_hidden_state`` has that norm applied, and whether ``hidden_states[-1]`` has it has
  changed between transformers versions, so neither is used: a forward hook on
  ``encoder.layers[L - 1]`` captures the block's output and stops the forward there, which
  also skips the blocks after ``L`` as fairseq's ``break`` does.

Waveform normalisation. Models trained with fairseq's ``normalize=True`` (the large
models, data2vec) see ``F.layer_norm(wav, wav.shape)``: zero mean and unit variance over
the whole utterance. :func:`layer_norm_waveform` does exactly that, once per utterance and
before any windowing, so a window never gets its own statistics.

Long audio. An utterance longer than ``window_seconds`` is cut into core windows of a whole
number of 320-sample hops; each runs with up to ``context_seconds`` of audio (also whole
hops) on each side, only the core's frames are kept, and the cores tile ``[0, T)``. The
conv front end is a valid convolution with receptive field 400 and stride 320, so frame
``j`` of a sub-window starting at sample ``320 * a`` is global frame ``a + j``: stitching
loses and duplicates nothing, and the result has exactly ``SSL.frames(len(wav))`` frames.
Frames far from a window edge match whole-utterance extraction closely but not exactly
(attention sees less audio; with a group-norm front end the norm's statistics are the
window's); see the tests for measured differences.

Batching. Windows are sorted by length and batched up to ``batch_seconds`` of padded audio.
Padding must not change any frame, which holds only where every cross-frame operation
before attention is local and the attention masks padded frames:

- layer-norm front ends with a single positional convolution (wav2vec 2.0 / HuBERT / WavLM
  large): padded with zeros and run with an ``attention_mask``;
- group-norm front ends (base models; the norm's statistics run over time and would include
  the padding) and data2vec-audio (its stack of positional convolutions carries padded
  frames into real ones): only windows of exactly equal length share a batch, unpadded.

Bits. Exact arithmetic would make batching invisible; float32 kernels sum in an order set
by shape, CPU, thread count and operand alignment, so batched and padded frames agree with
unbatched ones within rounding, and the same bits come back only for the same batches on
the same machine type. Loaded weights are moved to 64-byte-aligned storage
(:func:`align_weights`) so that how a checkpoint was loaded is not one of those causes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from units.features.extractor import FeatureSpec
from units.features.frames import SAMPLE_RATE, SSL, FrameContract

#: ``config.model_type`` of the supported families, and their transformers model classes.
ARCHITECTURES = {
    "hubert": "HubertModel",
    "wav2vec2": "Wav2Vec2Model",
    "wavlm": "WavLMModel",
    "data2vec-audio": "Data2VecAudioModel",
}
#: Epsilon of fairseq's ``F.layer_norm(wav, wav.shape)`` (torch's default).
WAVEFORM_NORM_EPS = 1e-5
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Weights a checkpoint may lack without changing inference: the mask embedding is only
# used for SpecAugment-style masking in training.
_OPTIONAL_WEIGHTS = ("masked_spec_embed",)
_HASH_CHUNK = 1 << 20


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded (missing, incomplete, corrupt, unsupported)."""


@dataclasses.dataclass(frozen=True, eq=False)
class SSLModel:
    """A loaded SSL model and what extraction needs to know about it.

    Attributes:
        model: The transformers model (``HubertModel``, ``Wav2Vec2Model``, ``WavLMModel`` or
            ``Data2VecAudioModel``) in eval mode.
        architecture: ``config.model_type``: ``hubert``, ``wav2vec2``, ``wavlm`` or
            ``data2vec-audio``.
        normalize_waveform: Whether waveforms are layer-normalised (whole utterance) first.
        num_layers: Transformer blocks.
        hidden_size: Feature dimension.
        group_norm: Whether the conv front end's first layer is a group norm over time
            (``config.feat_extract_norm == "group"``, the base models).
        stable_layer_norm: Pre-LN encoder (fairseq ``layer_norm_first``), the large models.
        path: Where the model came from.
        sha256: sha256 of the weight file (see :func:`weights_sha256`).
        source: ``hf`` or ``fairseq``: how it was loaded (the spec's ``extractor``).

    Example:
        >>> bundle = load_hf("/models/hubert-base-ls960")  # doctest: +SKIP
        >>> bundle.architecture, bundle.num_layers, bundle.normalize_waveform  # doctest: +SKIP
        ('hubert', 12, False)
    """

    model: Any
    architecture: str
    normalize_waveform: bool
    num_layers: int
    hidden_size: int
    group_norm: bool
    stable_layer_norm: bool
    path: str
    sha256: str
    source: str = "hf"

    @property
    def padding_invariant(self) -> bool:
        """Whether zero padding plus an attention mask leaves every real frame unchanged.

        False for group-norm front ends (statistics over time include the padding), for
        data2vec-audio with more than one positional convolution (the first one's output
        at padded frames is no longer zero, so the next one carries it into real frames),
        and for HuBERT's ``conv_pos_batch_norm`` variant (the same, through a batch norm).
        """
        if self.group_norm:
            return False
        config = self.model.config
        if getattr(config, "conv_pos_batch_norm", False):
            # Batch norm before the positional conv maps padded zeros to non-zeros.
            return False
        if self.architecture == "data2vec-audio":
            return int(getattr(config, "num_conv_pos_embeddings", 1)) <= 1
        return True

    @property
    def contract(self) -> FrameContract:
        """The conv front end's framing, from the config's kernels and strides."""
        return conv_contract(self.model.config)

    def spec(self, layer: int) -> FeatureSpec:
        """The spec of block ``layer``'s output (see :func:`layer_spec`)."""
        return layer_spec(
            layer,
            source=self.source,
            path=self.path,
            sha256=self.sha256,
            architecture=self.architecture,
            normalize_waveform=self.normalize_waveform,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            contract=self.contract,
        )

    @classmethod
    def from_transformers(
        cls,
        model: Any,
        *,
        path: str | os.PathLike,
        sha256: str,
        normalize_waveform: bool | None = None,
        source: str = "hf",
    ) -> SSLModel:
        """Bundles a transformers model of one of the four families (puts it in eval mode).

        Args:
            model: A ``HubertModel``, ``Wav2Vec2Model``, ``WavLMModel`` or
                ``Data2VecAudioModel``.
            path: Where it came from (recorded in the feature spec).
            sha256: Digest of its weights (recorded in the feature spec).
            normalize_waveform: ``None``: as the model was trained, guessed from the front
                end (layer-norm front ends were trained with ``normalize=True``).
            source: ``hf`` or ``fairseq``.

        Raises:
            ModelLoadError: Not one of the four families.
        """
        config = model.config
        facts = _config_facts(config, path, normalize_waveform)
        if not hasattr(model, "encoder") or not hasattr(model.encoder, "layers"):
            raise ModelLoadError(
                f"{path}: expected a bare {ARCHITECTURES[facts['architecture']]} "
                f"(with .encoder.layers), got {type(model).__name__}"
            )
        model.eval()
        align_weights(model)
        return cls(
            model=model,
            **facts,
            # The module's blocks: a caller may have cut some (a loaded directory has the
            # config's num_hidden_layers, which describe_config reads).
            num_layers=len(model.encoder.layers),
            group_norm=_front_end_norm(config) == "group",
            stable_layer_norm=bool(getattr(config, "do_stable_layer_norm", False)),
            path=str(path),
            sha256=sha256,
            source=source,
        )


#: Bytes to which the weights are aligned: torch's own CPU allocations are (c10's
#: ``gAlignment``), and so are a cache line and an AVX-512 register.
WEIGHT_ALIGNMENT = 64


def align_weights(model: torch.nn.Module) -> int:
    """Moves every CPU parameter and buffer not on a 64-byte boundary into fresh storage.

    Loaders hand back tensors wherever the file put them: transformers maps a
    ``.safetensors`` file and slices its tensors out of it at the offsets the header gives,
    8-byte aligned at best. MKL picks its GEMM kernels, and so the order of its sums, by
    the alignment of the operands as well as by CPU, so the same weights computed other
    bits from a mapped file than from memory on some CPUs (AMD EPYC: up to 4.8e-7 on the
    tiny test models). Copying them to torch's 64-byte-aligned allocations makes the
    determinism contract hold: one process computes the same bits from the same weights
    however they were loaded. It also lets the file go.

    Returns:
        How many tensors were moved.
    """
    moved = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % WEIGHT_ALIGNMENT:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
                moved += 1
    return moved


def _front_end_norm(config: Any) -> str:
    # data2vec-audio configs have no feat_extract_norm: its front end is always layer norm.
    return str(getattr(config, "feat_extract_norm", "layer"))


def _config_facts(
    config: Any, path: str | os.PathLike, normalize_waveform: bool | None
) -> dict[str, Any]:
    """What a transformers config decides about a model's features: ``architecture``,
    ``normalize_waveform`` and ``hidden_size``. The one place these are read, so a loaded
    model (:meth:`SSLModel.from_transformers`) and a described one (:func:`describe_config`)
    cannot disagree.

    Args:
        normalize_waveform: ``None``: as the model was trained, guessed from the front end
            (layer-norm front ends were trained with ``normalize=True``).

    Raises:
        ModelLoadError: Not one of the four families.
    """
    architecture = getattr(config, "model_type", None)
    if architecture not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: model_type {architecture!r} is not supported; "
            f"use one of {sorted(ARCHITECTURES)}"
        )
    if normalize_waveform is None:
        normalize_waveform = _front_end_norm(config) == "layer"
    return {
        "architecture": architecture,
        "normalize_waveform": bool(normalize_waveform),
        "hidden_size": int(config.hidden_size),
    }


def conv_contract(config: Any) -> FrameContract:
    """The framing of the conv front end a transformers config describes (its kernels and
    strides): receptive field and hop, in samples."""
    window, hop = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        window += (kernel - 1) * hop
        hop *= stride
    return FrameContract(window, hop)


def layer_spec(
    layer: int,
    *,
    source: str,
    path: str,
    sha256: str | None,
    architecture: str,
    normalize_waveform: bool,
    num_layers: int,
    hidden_size: int,
    contract: FrameContract,
) -> FeatureSpec:
    """The spec of block ``layer``'s output of a model, checked: what
    :class:`SSLExtractor` computes, and what :func:`describe_config` says it will.

    Raises:
        ValueError: ``layer`` not an int or out of ``1..num_layers``; a front end that is
            not the 400/320 SSL framing.
    """
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer={layer!r} should be an int (a block counted from 1)")
    layer = int(layer)
    if not 1 <= layer <= num_layers:
        raise ValueError(
            f"layer={layer!r} is out of range: {path} has transformer blocks "
            f"1..{num_layers} (layer L is block L's output, counted from 1)"
        )
    if contract != SSL:
        raise ValueError(
            f"{path}: conv front end frames audio as {contract}, not the "
            f"SSL contract {SSL} (receptive field 400, stride 320)"
        )
    return FeatureSpec(
        extractor=source,
        dim=hidden_size,
        window=SSL.window,
        hop=SSL.hop,
        checkpoint=path,
        checkpoint_sha256=sha256,
        layer=layer,
        normalize_waveform=normalize_waveform,
        architecture=architecture,
    )


def describe_config(
    config: Any,
    layer: int,
    *,
    source: str,
    path: str | os.PathLike,
    sha256: str | None,
    normalize_waveform: bool | None = None,
) -> FeatureSpec:
    """The spec of block ``layer`` of the model a transformers config describes, without
    building the model: what :class:`SSLExtractor` on the loaded model would report.

    Args:
        config: A ``HubertConfig``, ``Wav2Vec2Config``, ``WavLMConfig`` or
            ``Data2VecAudioConfig``.
        layer: Transformer block, counted from 1.
        source: ``hf`` or ``fairseq``.
        path: The checkpoint path, as the loader is given it.
        sha256: Digest of the weights (see :func:`weights_sha256`).
        normalize_waveform: As :meth:`SSLModel.from_transformers` takes it.

    Raises:
        ModelLoadError: Not one of the four families.
        ValueError: See :func:`layer_spec`.
    """
    return layer_spec(
        layer,
        source=source,
        path=os.fspath(path),
        sha256=sha256,
        **_config_facts(config, path, normalize_waveform),
        num_layers=int(config.num_hidden_layers),
        contract=conv_contract(config),
    )


def layer_norm_waveform(wav: np.ndarray) -> np.ndarray:
    """fairseq's waveform normalisation, ``F.layer_norm(wav, wav.shape)``, as float32.

    Zero mean and unit variance over the whole utterance (eps 1e-5, no affine). Always apply
    it to a whole utterance, never to a window.
    """
    t = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    if t.numel() == 0:
        return t.numpy()
    return torch.nn.functional.layer_norm(t, t.shape, eps=WAVEFORM_NORM_EPS).numpy()


def weights_sha256(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 of a model's weight files.

    One file: its plain sha256 (what ``sha256sum`` prints). Several (sharded checkpoints):
    the sha256 of ``sha256sum``-style lines ``"<digest>  <file name>\\n"`` sorted by name.
    """
    digests = []
    for path in sorted(paths, key=lambda p: os.path.basename(p)):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        digests.append((os.path.basename(path), h.hexdigest()))
    if len(digests) == 1:
        return digests[0][1]
    lines = "".join(f"{digest}  {name}\n" for name, digest in digests)
    return hashlib.sha256(lines.encode()).hexdigest()


def _weight_files(directory: str) -> list[str]:
    # transformers prefers safetensors when both exist, so those are the files it loads.
    names = sorted(os.listdir(directory))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    return [os.path.join(directory, n) for n in (safetensors or bins)]


def _read_do_normalize(directory: str) -> bool | None:
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f).get("do_normalize")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{path}: unreadable preprocessor config ({e})") from e
    return None if value is None else bool(value)


def load_hf(path: str | os.PathLike, device: str | torch.device = "cpu") -> SSLModel:
    """Loads a local Hugging Face model directory (never the network).

    The directory needs ``config.json`` with ``model_type`` one of ``hubert``,
    ``wav2vec2``, ``wavlm``, ``data2vec-audio`` and its weights (``*.safetensors`` or
    ``pytorch_model*.bin``); a checkpoint of a task model (``...ForCTC``) loads its base
    model. ``normalize_waveform`` comes from ``preprocessor_config.json``'s
    ``do_normalize`` when there is one, else from the front end: ``feat_extract_norm ==
    "layer"`` (fairseq's large models and data2vec train with ``normalize=True``).

    Args:
        path: The model directory.
        device: Where to put the model.

    Returns:
        The bundle, model in eval mode and float32.

    Raises:
        ModelLoadError: Missing path, a file instead of a directory, no config or weights,
            an unsupported ``model_type``, weights that do not load or do not fit the config.
    """
    directory, model_type, weights, do_normalize = _hf_directory(path)
    config = _hf_config(directory)

    import transformers

    model_cls = getattr(transformers, ARCHITECTURES[model_type])
    try:
        model, info = model_cls.from_pretrained(
            directory,
            config=config,
            local_files_only=True,
            dtype=torch.float32,  # Not "auto": a half-precision file still runs in float32.
            output_loading_info=True,
        )
    except Exception as e:  # Corrupt files surface as many types (OSError, SafetensorError...).
        raise ModelLoadError(
            f"{directory}: could not load weights ({type(e).__name__}: {e})"
        ) from e
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith(_OPTIONAL_WEIGHTS)]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        # transformers would leave these randomly initialised: features would be noise.
        raise ModelLoadError(
            f"{directory}: weights do not fit config.json "
            f"(missing {missing[:5]}, mismatched {mismatched[:5]})"
        )
    model.to(device)
    # A hub id stays the name the spec records: each node resolves it from its own cache.
    name = os.fspath(path) if is_hub_id(path) else directory
    return SSLModel.from_transformers(
        model, path=name, sha256=weights_sha256(weights), normalize_waveform=do_normalize
    )


def describe_hf(path: str | os.PathLike, layer: int) -> FeatureSpec:
    """The spec of block ``layer`` of a local Hugging Face model directory, from its
    ``config.json`` (and ``preprocessor_config.json``) and its weights' sha256: what
    ``SSLExtractor(load_hf(path), layer).spec`` is, without building the model or loading
    its weights.

    Raises:
        ModelLoadError: What :func:`load_hf` raises before it loads weights.
        ValueError: See :func:`layer_spec`.
    """
    directory, _, weights, do_normalize = _hf_directory(path)
    spec = describe_config(
        _hf_config(directory),
        layer,
        source="hf",
        path=os.fspath(path) if is_hub_id(path) else directory,
        sha256=None,
        normalize_waveform=do_normalize,
    )
    # Hashed last, so a bad layer fails without reading gigabytes of weights.
    return dataclasses.replace(spec, checkpoint_sha256=weights_sha256(weights))


#: ``ORG/NAME`` (or ``NAME``) as the Hugging Face hub names a model repository.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether ``path`` names no local file but reads as a hub id (``facebook/hubert-base``)."""
    text = os.fspath(path)
    return not os.path.exists(text) and _HUB_ID.fullmatch(text) is not None


def resolve_hf(path: str | os.PathLike) -> str:
    """The local directory of ``path``: the directory itself, or, for a hub id, its snapshot
    in the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``; offline, never a
    download: DESIGN.md, safe loading).

    Raises:
        ModelLoadError: A hub id that is not in the cache, saying how to put it there.
    """
    text = os.fspath(path)
    if not is_hub_id(text):
        return text
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(text, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, or an id the hub library refuses.
        raise ModelLoadError(
            f"model directory {text} does not exist, and {text!r} is not in the local Hugging "
            f"Face cache ({constants.HF_HUB_CACHE}): on a machine with network, run "
            f"`huggingface-cli download {text}` (or `hf download {text}`) and copy the cache "
            "there (or set HF_HUB_CACHE to it), or give the model's local directory "
            f"({type(e).__name__})"
        ) from None


def _hf_directory(path: str | os.PathLike) -> tuple[str, str, list[str], bool | None]:
    """``(directory, model_type, weight files, do_normalize)`` of a model directory, checked
    as far as it can be without transformers: it exists, has a supported ``config.json``
    and weights.

    Raises:
        ModelLoadError: Missing path, a file instead of a directory, no or an unreadable
            config, an unsupported ``model_type``, no weights.
    """
    directory = resolve_hf(path)
    if not os.path.exists(directory):
        raise ModelLoadError(f"model directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise ModelLoadError(
            f"{directory} is a file; load_hf takes a Hugging Face model directory "
            "(config.json + weights). For a fairseq .pt use units.features.fairseq_checkpoint"
        )
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ModelLoadError(f"{directory} has no config.json; is it a Hugging Face model?")
    try:
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{config_path}: unreadable ({e})") from e
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"{config_path}: model_type {model_type!r} is not supported; "
            f"use one of {sorted(ARCHITECTURES)}"
        )
    weights = _weight_files(directory)
    if not weights:
        raise ModelLoadError(f"{directory} has no weights (model.safetensors or pytorch_model.bin)")
    return directory, model_type, weights, _read_do_normalize(directory)


def _hf_config(directory: str) -> Any:
    """The transformers config of a checked model directory (a config object: no model code
    runs and no weights are read)."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad one.
        raise ModelLoadError(
            f"{directory}: could not read config.json ({type(e).__name__}: {e})"
        ) from e


def from_fairseq(
    loaded: Any,
    *,
    path: str | os.PathLike | None = None,
    sha256: str | None = None,
    normalize_waveform: bool | None = None,
) -> SSLModel:
    """Bundles what ``units.features.fairseq_checkpoint`` loads, with ``source="fairseq"``.

    Args:
        loaded: An :class:`SSLModel`, or an object with a ``model`` attribute (the
            transformers model) and ``path``, ``sha256`` and ``normalize_waveform`` (or
            fairseq's ``normalize``) attributes, or a bare transformers model when the
            keyword arguments are given.
        path: Checkpoint path (else ``loaded.path``).
        sha256: Checkpoint digest (else ``loaded.sha256``).
        normalize_waveform: The checkpoint's ``task.normalize`` (else read from ``loaded``,
            else guessed from the front end).

    Raises:
        ModelLoadError: Unsupported model, or no path / digest.
    """
    if isinstance(loaded, SSLModel):
        return dataclasses.replace(loaded, source="fairseq")
    model = getattr(loaded, "model", loaded)
    path = path if path is not None else getattr(loaded, "path", None)
    sha256 = sha256 if sha256 is not None else getattr(loaded, "sha256", None)
    if normalize_waveform is None:
        normalize_waveform = getattr(
            loaded, "normalize_waveform", getattr(loaded, "normalize", None)
        )
    if path is None or sha256 is None:
        raise ModelLoadError("from_fairseq needs the checkpoint's path and sha256")
    return SSLModel.from_transformers(
        model,
        path=path,
        sha256=sha256,
        normalize_waveform=normalize_waveform,
        source="fairseq",
    )


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One model input: samples ``[start, stop)`` of utterance ``utt``.

    Its local frames ``[keep_from, keep_to)`` become the utterance's frames from ``out_from``.
    """

    utt: int
    start: int
    stop: int
    keep_from: int
    keep_to: int
    out_from: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def plan_windows(
    num_samples: int, core_frames: int | None, context_frames: int, contract: FrameContract = SSL
) -> list[tuple[int, int, int, int, int]]:
    """Cuts an utterance into hop-aligned windows with context, for exactly T frames.

    Args:
        num_samples: Utterance length.
        core_frames: Frames per core window; ``None`` or ``T <= core_frames``: one window.
        context_frames: Extra frames of audio on each side of a core (fewer at the ends).
        contract: The front end's framing.

    Returns:
        ``(start, stop, keep_from, keep_to, out_from)`` per window: run samples
        ``[start, stop)``, keep its frames ``[keep_from, keep_to)`` as global frames from
        ``out_from``. The kept ranges tile ``[0, T)`` in order. The last window runs to the
        utterance's end, so a single window is exactly the whole utterance.

    Example:
        >>> plan_windows(16000, 20, 5)  # 49 frames: cores of 20, 20 and 9.
        [(0, 8080, 0, 20, 0), (4800, 14480, 5, 25, 20), (11200, 16000, 5, 14, 40)]
    """
    total = contract.frames(num_samples)
    if total == 0:
        return []
    if core_frames is None or total <= core_frames:
        return [(0, num_samples, 0, total, 0)]
    windows = []
    for first in range(0, total, core_frames):
        last = min(total, first + core_frames)  # Core frames [first, last).
        begin, end = max(0, first - context_frames), min(total, last + context_frames)
        start = begin * contract.hop
        stop = num_samples if end == total else start + contract.samples_for(end - begin)
        windows.append((start, stop, first - begin, last - begin, first))
    return windows


class _StopForward(Exception):
    """Raised by the capture hook once block ``L`` has run: the blocks after it are skipped."""


class SSLExtractor:
    """Block ``layer``'s output (counted from 1, as fairseq's ``output_layer``), batched.

    Args:
        model: The bundle (moved to ``device``; the module is shared, not copied).
        layer: Transformer block, ``1 <= layer <= model.num_layers``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``None`` (float32), or ``bf16`` / ``fp16`` autocast (CUDA only).
        batch_seconds: Padded audio per batch, seconds (a longer window runs alone).
        window_seconds: Core window length for long utterances; ``None``: never window.
            Utterances up to this length run whole.
        context_seconds: Extra audio on each side of a core window.
        threads: ``torch.set_num_threads`` (process-wide) for CPU work; ``None``: unchanged.
        extra_layers: Other blocks whose outputs :meth:`layers_on_device` returns from the
            same forward pass (several label sets from one model, one pass); the forward
            runs to the deepest block asked for. A block's output does not depend on the
            blocks after it, so each layer's features are those its own extractor computes.

    Raises:
        ValueError: Layer out of range, bad dtype / device combination, a front end that is
            not the 400/320 SSL framing, non-positive sizes.

    Example:
        >>> extract = SSLExtractor(load_hf("/models/hubert-base-ls960"), 9)  # doctest: +SKIP
        >>> [f.shape for f in extract([np.zeros(16000, np.float32)])]  # doctest: +SKIP
        [(49, 768)]
    """

    def __init__(
        self,
        model: SSLModel,
        layer: int,
        *,
        device: str | torch.device = "cpu",
        dtype: str | None = None,
        batch_seconds: float = 100.0,
        window_seconds: float | None = 40.0,
        context_seconds: float = 5.0,
        threads: int | None = None,
        extra_layers: Sequence[int] = (),
    ):
        self.spec = model.spec(layer)  # Checks the layer and the frame contract.
        self.specs = {layer: self.spec} | {extra: model.spec(extra) for extra in extra_layers}
        self.device = torch.device(device)
        if dtype is not None:
            if dtype not in _AUTOCAST_DTYPES:
                raise ValueError(f"dtype={dtype!r}: use None, 'bf16' or 'fp16'")
            if self.device.type != "cuda":
                raise ValueError(f"dtype={dtype!r} is autocast on CUDA only; device is {device}")
        if batch_seconds <= 0:
            raise ValueError(f"batch_seconds={batch_seconds} should be > 0")
        if window_seconds is not None and window_seconds <= 0:
            raise ValueError(f"window_seconds={window_seconds} should be > 0 or None")
        if context_seconds < 0:
            raise ValueError(f"context_seconds={context_seconds} should be >= 0")
        if threads is not None:
            torch.set_num_threads(threads)

        self.model = model
        self.layer = self.spec.layer
        self.dtype = dtype
        self.batch_samples = int(batch_seconds * SAMPLE_RATE)
        self.window_samples = None if window_seconds is None else int(window_seconds * SAMPLE_RATE)
        self.context_frames = int(context_seconds * SAMPLE_RATE) // SSL.hop
        self._module = model.model.to(self.device).eval()
        self._blocks = {n: self._module.encoder.layers[n - 1] for n in sorted(self.specs)}
        #: Samples run through the model, padding included, and the audio among them: what
        #: length bucketing saves shows in ``padding_fraction``.
        self.samples_run = self.samples_audio = 0

    @property
    def padding_fraction(self) -> float:
        """Share of the samples run that were padding, over every call so far."""
        return 1.0 - self.samples_audio / self.samples_run if self.samples_run else 0.0

    def __call__(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features of each 16 kHz mono waveform.

        Returns:
            float32 ``(T_i, dim)`` per waveform, ``T_i == SSL.frames(len(w_i))`` (0 rows
            below 400 samples).

        Raises:
            ValueError: A waveform that is not one-dimensional.
        """
        return [f.numpy() for f in self.on_device(waveforms, host=True)]

    def on_device(self, waveforms: Sequence[np.ndarray], host: bool = False) -> list[torch.Tensor]:
        """The features of :meth:`__call__` as float32 tensors on the extractor's device,
        where a GPU consumer (the label pass's centroid search) takes them without a copy
        to the host and back; ``host=True`` brings each batch to the CPU as it is done."""
        return self.layers_on_device(waveforms, host)[self.layer]

    def layers_on_device(
        self, waveforms: Sequence[np.ndarray], host: bool = False
    ) -> dict[int, list[torch.Tensor]]:
        """:meth:`on_device` for the layer and every one of ``extra_layers``, from one
        forward pass per batch: ``{layer: features per waveform}``."""
        wavs = []
        for i, w in enumerate(waveforms):
            w = np.asarray(w, dtype=np.float32)
            if w.ndim != 1:
                raise ValueError(f"waveform {i} has shape {w.shape}; expected mono (N,)")
            # Whole-utterance statistics, before any windowing (fairseq's normalize=True).
            wavs.append(layer_norm_waveform(w) if self.model.normalize_waveform else w)
        where = torch.device("cpu") if host else self.device
        outputs = {
            layer: [
                torch.zeros((SSL.frames(len(w)), spec.dim), dtype=torch.float32, device=where)
                for w in wavs
            ]
            for layer, spec in self.specs.items()
        }
        pieces = [
            _Piece(utt, *window)
            for utt, w in enumerate(wavs)
            for window in plan_windows(len(w), self._core_frames(len(w)), self.context_frames)
        ]
        with torch.inference_mode():
            for batch in self._batches(pieces):
                layers = self._forward([wavs[p.utt][p.start : p.stop] for p in batch], where)
                for layer, features in layers.items():
                    for p, f in zip(batch, features, strict=True):
                        kept = f[p.keep_from : p.keep_to]
                        outputs[layer][p.utt][p.out_from : p.out_from + len(kept)] = kept
        return outputs

    def _core_frames(self, num_samples: int) -> int | None:
        """Core window in frames for an utterance, ``None`` to run it whole."""
        if self.window_samples is None or num_samples <= self.window_samples:
            return None
        return max(1, self.window_samples // SSL.hop)

    def _batches(self, pieces: list[_Piece]) -> list[list[_Piece]]:
        """Groups pieces, longest first, into batches of at most ``batch_samples`` padded."""
        ordered = sorted(pieces, key=lambda p: (-p.length, p.utt, p.start))
        batches: list[list[_Piece]] = []
        for p in ordered:
            current = batches[-1] if batches else None
            fits = (
                current is not None
                and current[0].length * (len(current) + 1) <= self.batch_samples
                # Sorted longest first, so current[0] is the batch's padded length.
                and (self.model.padding_invariant or p.length == current[0].length)
            )
            if fits:
                current.append(p)
            else:
                batches.append([p])
        return batches

    def _forward(
        self, chunks: list[np.ndarray], where: torch.device
    ) -> dict[int, list[torch.Tensor]]:
        """Each block's output (the layer's and the extra layers') for each chunk, sliced to
        the chunk's own frame count, float32 on ``where``."""
        lengths = [len(c) for c in chunks]
        longest = max(lengths)
        self.samples_run += longest * len(chunks)
        self.samples_audio += sum(lengths)
        batch = np.zeros((len(chunks), longest), dtype=np.float32)
        for i, c in enumerate(chunks):
            batch[i, : len(c)] = c
        inputs = {"input_values": self._to_device(torch.from_numpy(batch))}
        if min(lengths) < longest:
            # Only padding-invariant models get here with unequal lengths (see _batches).
            mask = np.zeros((len(chunks), longest), dtype=np.int64)
            for i, n in enumerate(lengths):
                mask[i, :n] = 1
            inputs["attention_mask"] = self._to_device(torch.from_numpy(mask))

        captured: dict[int, torch.Tensor] = {}
        caller = threading.get_ident()
        deepest = max(self._blocks)

        def capture(layer):
            def hook(_module, _args, output):
                if threading.get_ident() != caller:
                    return  # Another thread's forward through the same shared module.
                # WavLM blocks return (hidden_states, position_bias).
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == deepest:
                    raise _StopForward  # The blocks after it are not needed.

            return hook

        handles = [b.register_forward_hook(capture(n)) for n, b in self._blocks.items()]
        try:
            with self._autocast():
                self._module(**inputs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        out = {}
        for layer in self._blocks:
            if layer not in captured:
                raise RuntimeError(f"block {layer} of {self.model.path} did not run")
            hidden = captured[layer].float().to(where)
            if hidden.shape[1] != SSL.frames(longest):
                raise RuntimeError(
                    f"{self.model.path}: {hidden.shape[1]} frames for {longest} samples, "
                    f"expected {SSL.frames(longest)}"
                )
            out[layer] = [hidden[i, : SSL.frames(n)] for i, n in enumerate(lengths)]
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t
        # Pinned host memory lets the copy run asynchronously with queued GPU work.
        return t.pin_memory().to(self.device, non_blocking=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[self.dtype])
