"""Loading fairseq HuBERT / wav2vec 2.0 checkpoints without fairseq and without running pickles.

fairseq is not installed here, so the checkpoints are written by the helpers below: a tiny,
randomly initialised transformers model is laid out the way fairseq names its modules (an
inverse mapping written independently of the loader's), with a ``cfg`` dict (or an old-style
``args`` Namespace) like fairseq's. A second, independent check runs fairseq's forward pass,
re-implemented from ``fairseq/models/wav2vec/wav2vec2.py`` in plain torch on the fairseq
state dict, against the loaded transformers model.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import (
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
)

from units.features.fairseq_checkpoint import (
    CheckpointError,
    FairseqDictionaryPlaceholder,
    UnsafeCheckpointError,
    describe_fairseq,
    load_checkpoint_state,
    load_fairseq,
    parse_conv_feature_layers,
    sha256_file,
)

HUBERT_CONV = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
WAV2VEC2_CONV = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
TINY_CONV = "[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2"

# base: group norm in the first conv block, post-LN transformer; large: layer norm in every
# conv block, pre-LN ("stable layer norm") transformer, conv bias.
VARIANTS = {
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "large": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}


# --------------------------------------------------------------------------- helpers


def tiny_model(architecture: str, variant: str, seed: int = 0, conv_width: int = 16):
    """A tiny transformers model with every parameter randomised (no 1/0 layer norms)."""
    config_cls, model_cls = {
        "hubert": (HubertConfig, HubertModel),
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    }[architecture]
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(conv_width,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.65,
        **VARIANTS[variant],
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


_HF_TO_FAIRSEQ = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"feature_projection\.layer_norm\.", "layer_norm."),
    (r"feature_projection\.projection\.", "post_extract_proj."),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
     "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
     "encoder.pos_conv.0.weight_v"),
    (r"encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
]  # fmt: skip


def fairseq_state_dict(model, architecture: str) -> dict[str, torch.Tensor]:
    """The model's weights under fairseq's module names, plus pre-training-only keys."""
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        match = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)", name)
        if match:
            i, kind = match.groups()
            if config.feat_extract_norm == "group":
                new = f"feature_extractor.conv_layers.{i}.2.{kind}"  # Fp32GroupNorm
            else:
                new = f"feature_extractor.conv_layers.{i}.2.1.{kind}"  # Seq(T, LayerNorm, T)
        else:
            new = name
            for pattern, replacement in _HF_TO_FAIRSEQ:
                new = re.sub(pattern, replacement, new)
        out[new] = value.detach().clone()
    gen = torch.Generator().manual_seed(7)
    hidden = config.hidden_size
    out["final_proj.weight"] = torch.randn(8, hidden, generator=gen)
    out["final_proj.bias"] = torch.randn(8, generator=gen)
    if architecture == "hubert":
        out["label_embs_concat"] = torch.randn(504, 8, generator=gen)
    else:
        out["quantizer.vars"] = torch.randn(1, 2 * 5, 4, generator=gen)
        out["quantizer.weight_proj.weight"] = torch.randn(10, config.conv_dim[-1], generator=gen)
        out["quantizer.weight_proj.bias"] = torch.randn(10, generator=gen)
        out["project_q.weight"] = torch.randn(8, 8, generator=gen)
        out["project_q.bias"] = torch.randn(8, generator=gen)
    return out


def fairseq_model_cfg(model, architecture: str) -> dict:
    """A fairseq model config dict, as ``OmegaConf.to_container`` leaves it in ``cfg``."""
    c = model.config
    layers = list(zip(c.conv_dim, c.conv_kernel, c.conv_stride, strict=True))
    cfg = {
        "_name": architecture,
        "extractor_mode": "default" if c.feat_extract_norm == "group" else "layer_norm",
        "encoder_layers": c.num_hidden_layers,
        "encoder_embed_dim": c.hidden_size,
        "encoder_ffn_embed_dim": c.intermediate_size,
        "encoder_attention_heads": c.num_attention_heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.05,
        "dropout_input": 0.1,
        "dropout_features": 0.1,
        "final_dim": 8,
        "layer_norm_first": c.do_stable_layer_norm,
        "conv_feature_layers": " + ".join(f"[({d},{k},{s})]" for d, k, s in layers),
        "conv_bias": c.conv_bias,
        "logit_temp": 0.1,
        "target_glu": False,
        "feature_grad_mult": 0.1,
        "mask_length": 10,
        "mask_prob": 0.65 if architecture == "wav2vec2" else 0.8,
        "mask_selection": "static",
        "mask_other": 0.0,
        "no_mask_overlap": False,
        "mask_min_space": 1,
        "mask_channel_length": 10,
        "mask_channel_prob": 0.0,
        "conv_pos": c.num_conv_pos_embeddings,
        "conv_pos_groups": c.num_conv_pos_embedding_groups,
        "pos_conv_depth": 1,
        "latent_temp": [2.0, 0.5, 0.999995],
        "required_seq_len_multiple": 2,
        "checkpoint_activations": False,
    }
    if architecture == "hubert":
        cfg.update(label_rate=50, untie_final_proj=False, skip_masked=False, skip_nomask=False)
    else:
        cfg.update(quantize_targets=True, quantize_input=False, latent_vars=5, latent_groups=2)
    return cfg


def training_state() -> dict:
    """What fairseq saves besides the model: plain values, tensors and numpy scalars."""
    return {
        "optimizer_history": [
            {
                "criterion_name": "HubertCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": np.float64(3.25)},
                "num_updates": np.int64(400000),
            }
        ],
        "extra_state": {
            "epoch": 12,
            "train_iterator": {"epoch": 12, "iterations_in_epoch": 31, "shuffle": True},
            "val_loss": np.float32(3.5),
            "best": np.float64(3.25),
            "previous_training_time": 123456.7,
            "metrics": collections.OrderedDict(
                [("train", [("loss", 0, "AverageMeter", {"val": 3.1, "sum": 9.3, "count": 3})])]
            ),
        },
        "last_optimizer_state": {
            "state": {0: {"step": 3, "exp_avg": torch.zeros(4)}},
            "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98), "params": [0]}],
        },
    }


def cfg_checkpoint(model, architecture: str, normalize: bool, **extra) -> dict:
    task = "hubert_pretraining" if architecture == "hubert" else "audio_pretraining"
    return {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {"fp16": True, "log_interval": 200, "seed": 1337},
            "model": fairseq_model_cfg(model, architecture),
            "task": {"_name": task, "data": "/data", "normalize": normalize, "sample_rate": 16000},
            "criterion": {"_name": "hubert" if architecture == "hubert" else "wav2vec"},
        },
        "model": fairseq_state_dict(model, architecture),
        **training_state(),
        **extra,
    }


def args_checkpoint(model, normalize: bool) -> dict:
    """An old (pre-hydra) wav2vec 2.0 checkpoint: ``args`` is an argparse.Namespace."""
    fields = fairseq_model_cfg(model, "wav2vec2")
    del fields["_name"]
    args = argparse.Namespace(
        arch="wav2vec2", task="audio_pretraining", criterion="wav2vec", normalize=normalize,
        sample_rate=16000, max_update=400000, lr=[0.0005], **fields,
    )  # fmt: skip
    return {"args": args, "model": fairseq_state_dict(model, "wav2vec2"), **training_state()}


def finetuned_checkpoint(model, architecture: str, normalize: bool) -> dict:
    """A CTC fine-tuned checkpoint: the encoder under w2v_encoder.w2v_model., a CTC head."""
    pretrained = cfg_checkpoint(model, architecture, normalize)
    state = {
        f"w2v_encoder.w2v_model.{k}": v
        for k, v in pretrained["model"].items()
        if not k.startswith(("final_proj", "label_embs", "quantizer", "project_q"))
    }
    state["w2v_encoder.proj.weight"] = torch.randn(29, model.config.hidden_size)
    state["w2v_encoder.proj.bias"] = torch.randn(29)
    name = "hubert_ctc" if architecture == "hubert" else "wav2vec_ctc"
    return {
        "args": None,
        "cfg": {
            "model": {
                "_name": name,
                "w2v_path": "/checkpoint/pretrained.pt",
                "apply_mask": True,
                "w2v_args": pretrained["cfg"],
            },
            "task": {"_name": "audio_finetuning", "normalize": normalize, "labels": "ltr"},
        },
        "model": state,
    }


def save(state: dict, path, legacy: bool = False):
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def audio(batch: int = 2, samples: int = 4000, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))


def hidden_states(model, wav):
    with torch.no_grad():
        out = model(wav, output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states


def assert_same_outputs(reference, loaded, wav):
    ref_last, ref_hidden = hidden_states(reference, wav)
    last, hidden = hidden_states(loaded, wav)
    assert len(hidden) == len(ref_hidden) == reference.config.num_hidden_layers + 1
    torch.testing.assert_close(last, ref_last, rtol=0, atol=0)
    for got, want in zip(hidden, ref_hidden, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------- fairseq's forward, re-implemented independently


def fairseq_forward(state: dict, cfg: dict, wav: torch.Tensor):
    """fairseq Wav2Vec2Model / HubertModel ``extract_features`` in eval mode, on its own keys.

    Returns (encoder input, [block outputs], encoder output).
    """
    mode, lnf = cfg["extractor_mode"], cfg["layer_norm_first"]
    layers = parse_conv_feature_layers(cfg["conv_feature_layers"])
    x = wav.unsqueeze(1)
    for i, (dim, _, stride) in enumerate(layers):
        pre = f"feature_extractor.conv_layers.{i}"
        x = F.conv1d(x, state[f"{pre}.0.weight"], state.get(f"{pre}.0.bias"), stride=stride)
        if mode == "layer_norm":
            w, b = state[f"{pre}.2.1.weight"], state[f"{pre}.2.1.bias"]
            x = F.layer_norm(x.transpose(1, 2), (dim,), w, b, 1e-5).transpose(1, 2)
        elif i == 0:
            x = F.group_norm(x, dim, state[f"{pre}.2.weight"], state[f"{pre}.2.bias"], 1e-5)
        x = F.gelu(x)
    x = x.transpose(1, 2)

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-5)

    def linear(t, name):
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    x = ln(x, "layer_norm")
    if "post_extract_proj.weight" in state:
        x = linear(x, "post_extract_proj")

    # Positional conv: weight norm over dim 2, "same" padding, GELU.
    g, v = state["encoder.pos_conv.0.weight_g"], state["encoder.pos_conv.0.weight_v"]
    weight = g * v / v.norm(dim=(0, 1), keepdim=True)
    k = cfg["conv_pos"]
    pos = F.conv1d(
        x.transpose(1, 2),
        weight,
        state["encoder.pos_conv.0.bias"],
        padding=k // 2,
        groups=cfg["conv_pos_groups"],
    )
    if k % 2 == 0:
        pos = pos[:, :, :-1]
    x = x + F.gelu(pos).transpose(1, 2)
    if not lnf:
        x = ln(x, "encoder.layer_norm")
    encoder_input = x

    heads = cfg["encoder_attention_heads"]

    def attention(t, name):
        bsz, steps, dim = t.shape
        head_dim = dim // heads
        q = linear(t, f"{name}.q_proj") * head_dim**-0.5
        k_, v_ = linear(t, f"{name}.k_proj"), linear(t, f"{name}.v_proj")

        def split(u):
            return u.view(bsz, steps, heads, head_dim).transpose(1, 2)

        probs = torch.softmax(split(q) @ split(k_).transpose(-1, -2), dim=-1)
        out = (probs @ split(v_)).transpose(1, 2).reshape(bsz, steps, dim)
        return linear(out, f"{name}.out_proj")

    outputs = []
    for i in range(cfg["encoder_layers"]):
        pre = f"encoder.layers.{i}"
        residual = x
        if lnf:
            x = residual + attention(ln(x, f"{pre}.self_attn_layer_norm"), f"{pre}.self_attn")
            residual = x
            x = ln(x, f"{pre}.final_layer_norm")
            x = residual + linear(F.gelu(linear(x, f"{pre}.fc1")), f"{pre}.fc2")
        else:
            x = ln(residual + attention(x, f"{pre}.self_attn"), f"{pre}.self_attn_layer_norm")
            residual = x
            x = residual + linear(F.gelu(linear(x, f"{pre}.fc1")), f"{pre}.fc2")
            x = ln(x, f"{pre}.final_layer_norm")
        outputs.append(x)
    final = ln(x, "encoder.layer_norm") if lnf else x
    return encoder_input, outputs, final


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("architecture", ["hubert", "wav2vec2"])
def test_cfg_checkpoint_round_trip(tmp_path, architecture, variant):
    reference = tiny_model(architecture, variant)
    normalize = variant == "large"
    path = save(cfg_checkpoint(reference, architecture, normalize), tmp_path / "ckpt.pt")

    fm = load_fairseq(path)

    assert fm.architecture == architecture
    assert fm.normalize_waveform is normalize
    assert fm.path == str(path)
    assert fm.sha256 == sha256_file(path) and len(fm.sha256) == 64
    assert type(fm.model) is type(reference)
    assert not fm.model.training
    assert fm.config.feat_extract_norm == VARIANTS[variant]["feat_extract_norm"]
    assert fm.config.do_stable_layer_norm == VARIANTS[variant]["do_stable_layer_norm"]
    assert fm.config.conv_bias == VARIANTS[variant]["conv_bias"]
    assert tuple(fm.config.conv_kernel) == (10, 3, 3, 3, 3, 2, 2)
    assert tuple(fm.config.conv_stride) == (5, 2, 2, 2, 2, 2, 2)
    assert fm.config.num_conv_pos_embeddings == 8
    assert fm.config.num_conv_pos_embedding_groups == 4
    ignored = {"final_proj.weight", "final_proj.bias"}
    ignored |= {"label_embs_concat"} if architecture == "hubert" else {"project_q.weight"}
    assert ignored <= set(fm.ignored_keys)
    assert_same_outputs(reference, fm.model, audio())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("architecture", ["hubert", "wav2vec2"])
def test_matches_fairseq_forward_reimplementation(tmp_path, architecture, variant):
    reference = tiny_model(architecture, variant, seed=5)
    state = cfg_checkpoint(reference, architecture, normalize=False)
    fm = load_fairseq(save(state, tmp_path / "ckpt.pt"))
    wav = audio(samples=5000)

    encoder_input, blocks, final = fairseq_forward(state["model"], state["cfg"]["model"], wav)
    last, hidden = hidden_states(fm.model, wav)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    close(last, final)
    close(hidden[0], encoder_input)
    # hidden_states[i] is block i's output, as fairseq's extract_features(output_layer=i)
    # returns it; only last_hidden_state has the final layer norm of a pre-LN model.
    for i, block in enumerate(blocks, start=1):
        close(hidden[i], block)
    assert last.shape[1] == (wav.shape[1] - 400) // 320 + 1  # the 50 Hz frame contract


def test_args_namespace_checkpoint(tmp_path):
    reference = tiny_model("wav2vec2", "base", seed=11)
    path = save(args_checkpoint(reference, normalize=True), tmp_path / "old.pt")
    fm = load_fairseq(path)
    assert (fm.architecture, fm.normalize_waveform) == ("wav2vec2", True)
    assert_same_outputs(reference, fm.model, audio())


def test_legacy_serialization_format(tmp_path):
    """fairseq checkpoints from before torch 1.6 are not zip files."""
    reference = tiny_model("wav2vec2", "large", seed=12)
    path = save(args_checkpoint(reference, normalize=False), tmp_path / "legacy.pt", legacy=True)
    fm = load_fairseq(path)
    assert fm.normalize_waveform is False
    assert_same_outputs(reference, fm.model, audio())


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path`` (Linux's /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                start, stop = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, stop))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_mmap_maps_the_tensors_instead_of_reading_them(tmp_path):
    path = save(cfg_checkpoint(tiny_model("hubert", "base"), "hubert", False), tmp_path / "h.pt")
    state = load_checkpoint_state(path, mmap=True)
    ranges = _mapped_ranges(path)
    tensors = list(state["model"].values())
    assert ranges and all(any(a <= t.data_ptr() < b for a, b in ranges) for t in tensors)
    read = load_checkpoint_state(path)
    assert all(torch.equal(read["model"][k], t) for k, t in state["model"].items())
    legacy = save(args_checkpoint(tiny_model("wav2vec2", "base"), False), tmp_path / "old.pt", True)
    assert load_checkpoint_state(legacy, mmap=True).keys() == load_checkpoint_state(legacy).keys()


@pytest.mark.parametrize("architecture", ["hubert", "wav2vec2"])
def test_ctc_finetuned_checkpoint(tmp_path, architecture):
    reference = tiny_model(architecture, "large", seed=13)
    path = save(finetuned_checkpoint(reference, architecture, True), tmp_path / "ctc.pt")
    fm = load_fairseq(path)
    assert (fm.architecture, fm.normalize_waveform) == (architecture, True)
    assert set(fm.ignored_keys) == {"w2v_encoder.proj.weight", "w2v_encoder.proj.bias"}
    assert_same_outputs(reference, fm.model, audio())


def test_no_post_extract_proj_when_widths_agree(tmp_path):
    """fairseq has no post_extract_proj when conv width == encoder width: identity."""
    reference = tiny_model("hubert", "base", seed=14, conv_width=32)
    with torch.no_grad():
        reference.feature_projection.projection.weight.copy_(torch.eye(32))
        reference.feature_projection.projection.bias.zero_()
    state = cfg_checkpoint(reference, "hubert", normalize=False)
    del state["model"]["post_extract_proj.weight"], state["model"]["post_extract_proj.bias"]
    fm = load_fairseq(save(state, tmp_path / "ckpt.pt"))
    assert_same_outputs(reference, fm.model, audio())


def test_fairseq_dictionary_in_task_state_stays_inert(tmp_path, monkeypatch):
    """HuBERT checkpoints pickle fairseq Dictionary objects: built as inert placeholders."""
    marker = tmp_path / "dictionary-code-ran"

    class Dictionary:
        def __init__(self):
            self.symbols, self.indices, self.bos_word = ["<s>", "a"], {"<s>": 0, "a": 1}, "<s>"

        def __setstate__(self, state):  # fairseq code: must never run on load
            marker.write_text("ran")
            self.__dict__.update(state)

    _fake_module(monkeypatch, "fairseq.data.dictionary", Dictionary=Dictionary)
    reference = tiny_model("hubert", "base", seed=15)
    state = cfg_checkpoint(reference, "hubert", False, task_state={"dictionaries": [Dictionary()]})
    path = save(state, tmp_path / "ckpt.pt")

    loaded = load_checkpoint_state(path)
    (placeholder,) = loaded["task_state"]["dictionaries"]
    assert type(placeholder) is FairseqDictionaryPlaceholder
    assert placeholder.state["symbols"] == ["<s>", "a"]
    assert load_fairseq(path).architecture == "hubert"
    assert not marker.exists()


# --------------------------------------------------------------------------- config parsing


@pytest.mark.parametrize(
    "spec",
    [
        HUBERT_CONV,  # HuBERT base/large/xlarge
        WAV2VEC2_CONV,  # wav2vec 2.0 base/large (fairseq's current default)
        "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2",
        "[(512, 10, 5)] + [(512, 3, 2)]*4 + [(512,2,2)]*2",
    ],
)
def test_parse_real_conv_feature_layers(spec):
    layers = parse_conv_feature_layers(spec)
    assert layers == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    # Receptive field 400 and hop 320 samples: the SSL frame contract.
    assert math.prod(s for _, _, s in layers) == 320
    field = 1
    for _, kernel, stride in reversed(layers):
        field = (field - 1) * stride + kernel
    assert field == 400


def test_parse_other_conv_feature_layers():
    assert parse_conv_feature_layers(
        "[(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)]"
    ) == [(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)]
    assert parse_conv_feature_layers("2 * [(16, 3, 2)]") == [(16, 3, 2)] * 2
    assert parse_conv_feature_layers([[16, 10, 5], (16, 3, 2)]) == [(16, 10, 5), (16, 3, 2)]


@pytest.mark.parametrize(
    "spec",
    [
        "__import__('os').system('touch /tmp/pwned')",
        "[(512,10,5)] * 10**9",
        "[(512,10,5)] * 100000",
        "[(512,10,5)] * -1",
        "[x]",
        "[(512, 10)]",
        "[(1.5, 2, 3)]",
        "[(True, 2, 3)]",
        "[(0, 2, 3)]",
        "[(512, 10, 5)] - [(512, 3, 2)]",
        "[]",
        "[(512,10,5)] + ",
        "open('/etc/passwd').read()",
        "[(512,10,5)][0]",
    ],
)
def test_parse_rejects_anything_but_list_literals(spec):
    with pytest.raises(CheckpointError, match="conv_feature_layers"):
        parse_conv_feature_layers(spec)


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def good_state():
    return cfg_checkpoint(tiny_model("hubert", "base", seed=21), "hubert", normalize=False)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_fairseq(tmp_path / "nope.pt")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as info:
        load_fairseq(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_truncated_checkpoint(tmp_path, good_state):
    full = save(good_state, tmp_path / "full.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_fairseq(path)


def test_not_a_fairseq_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="'model' state dict"):
        load_fairseq(save({"weights": {}}, tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="not a fairseq checkpoint"):
        load_fairseq(save([torch.zeros(1)], tmp_path / "list.pt"))


def test_unknown_architecture(tmp_path, good_state):
    state = dict(good_state, cfg=dict(good_state["cfg"]))
    state["cfg"]["model"] = dict(state["cfg"]["model"], _name="data2vec_audio")
    with pytest.raises(CheckpointError, match="unsupported fairseq model 'data2vec_audio'"):
        load_fairseq(save(state, tmp_path / "ckpt.pt"))


def test_unknown_architecture_in_args(tmp_path):
    state = args_checkpoint(tiny_model("wav2vec2", "base"), normalize=False)
    state["args"].arch = "wav2vec"
    with pytest.raises(CheckpointError, match="unsupported fairseq model 'wav2vec'"):
        load_fairseq(save(state, tmp_path / "ckpt.pt"))


def test_unsupported_layer_type(tmp_path, good_state):
    state = dict(good_state, cfg=dict(good_state["cfg"]))
    state["cfg"]["model"] = dict(state["cfg"]["model"], layer_type="conformer")
    with pytest.raises(CheckpointError, match="layer_type 'conformer'"):
        load_fairseq(save(state, tmp_path / "ckpt.pt"))


def test_missing_weight_key(tmp_path, good_state):
    state = dict(good_state, model=dict(good_state["model"]))
    del state["model"]["encoder.layers.1.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.feed_forward\.output_dense"):
        load_fairseq(save(state, tmp_path / "ckpt.pt"))


def test_unexpected_weight_key(tmp_path, good_state):
    state = dict(good_state, model=dict(good_state["model"]))
    state["model"]["encoder.layers.7.fc1.weight"] = torch.zeros(64, 32)
    state["model"]["encoder.pos_conv.1.weight"] = torch.zeros(32)
    with pytest.raises(CheckpointError, match="unexpected key") as info:
        load_fairseq(save(state, tmp_path / "ckpt.pt"))
    assert "encoder.layers.7.fc1.weight" in str(info.value)
    assert "encoder.pos_conv.1.weight" in str(info.value)


def test_layer_norm_key_in_group_norm_model_is_unexpected(tmp_path, good_state):
    """A layer_norm-mode conv key in a default-mode checkpoint is not silently remapped."""
    state = dict(good_state, model=dict(good_state["model"]))
    state["model"]["feature_extractor.conv_layers.0.2.1.weight"] = torch.ones(16)
    with pytest.raises(CheckpointError, match=r"conv_layers\.0\.2\.1\.weight"):
        load_fairseq(save(state, tmp_path / "ckpt.pt"))


def test_shape_mismatch(tmp_path, good_state):
    state = dict(good_state, model=dict(good_state["model"]))
    state["model"]["encoder.layers.0.fc1.weight"] = torch.zeros(48, 32)
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        load_fairseq(save(state, tmp_path / "ckpt.pt"))
    assert "encoder.layers.0.fc1.weight (48, 32)" in str(info.value)


# ------------------------------------------------------------ objects outside the allow-list


def _fake_module(monkeypatch, dotted: str, **attrs) -> types.ModuleType:
    """Register an importable module (and its parents) so pickle can name ``attrs`` in it."""
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    module = types.ModuleType(dotted)
    for name, obj in attrs.items():
        obj.__module__, obj.__qualname__ = dotted, name
        setattr(module, name, obj)
    monkeypatch.setitem(sys.modules, dotted, module)
    return module


@pytest.fixture
def payloads(monkeypatch, tmp_path):
    """Two pickles that run code when unpickled unsafely: via __reduce__ and __setstate__."""
    marker = tmp_path / "payload-ran"

    def write_marker(path):
        with open(path, "w") as f:
            f.write("code ran")
        return path

    class ReduceBomb:
        def __reduce__(self):
            return (write_marker, (str(marker),))

    class SetStateBomb:
        def __init__(self):
            self.payload = "x"  # a non-empty state, so that unpickling calls __setstate__

        def __setstate__(self, state):
            write_marker(str(marker))

    _fake_module(
        monkeypatch,
        "unitpipe_untrusted_payload",
        write_marker=write_marker,
        ReduceBomb=ReduceBomb,
        SetStateBomb=SetStateBomb,
    )
    return marker, ReduceBomb, SetStateBomb


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        ("ReduceBomb", "unitpipe_untrusted_payload.write_marker"),
        ("SetStateBomb", "unitpipe_untrusted_payload.SetStateBomb"),
    ],
)
def test_object_outside_allow_list_is_refused_and_never_runs(
    tmp_path, good_state, payloads, payload, refused, legacy
):
    marker, reduce_bomb, set_state_bomb = payloads
    bomb = {"ReduceBomb": reduce_bomb, "SetStateBomb": set_state_bomb}[payload]()
    state = dict(good_state, extra_state=dict(good_state["extra_state"], custom=bomb))
    path = save(state, tmp_path / "evil.pt", legacy=legacy)

    with pytest.raises(UnsafeCheckpointError) as info:
        load_fairseq(path)
    assert not marker.exists()
    assert refused in info.value.unsafe_globals
    message = str(info.value)
    assert refused in message and "weights_only=False" in message  # how to convert
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_state(path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_state(path, mmap=True)
    with pytest.raises(UnsafeCheckpointError):
        describe_fairseq(path, 1)  # Reading the config alone is as safe as loading.
    assert not marker.exists()

    # The trap is armed: an unsafe load of the same file would have run the payload.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_object_numpy_arrays_are_refused(tmp_path, good_state):
    state = dict(good_state, extra_state={"odd": np.array(["a", 1], dtype=object)})
    with pytest.raises(UnsafeCheckpointError, match="ObjectDType"):
        load_fairseq(save(state, tmp_path / "ckpt.pt"))


def test_fp16_weights_are_cast(tmp_path):
    """Some released checkpoints store fp16 weights: they load into the float32 model."""
    reference = tiny_model("hubert", "large", seed=31)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.half().float())
    state = cfg_checkpoint(reference, "hubert", normalize=True)
    state["model"] = {k: v.half() for k, v in state["model"].items()}
    fm = load_fairseq(save(state, tmp_path / "ckpt.pt"))
    assert all(p.dtype == torch.float32 for p in fm.model.parameters())
    assert_same_outputs(reference, fm.model, audio())
