"""Named presets of both papers at six sizes: ``build(name, size="tiny", **overrides)``.

Every preset is a configuration of :class:`DeepMemoryConfig`: a block pattern plus, for the
memory models, an :class:`~deepmemory.ops.UpdateRule` and the memory layer's own settings (the
families of Titans §4 and ATLAS §5; docs/models/index.md); sizes follow ATLAS Table 7. At the
paper sizes every preset's parameter count (tied 32000-token embeddings included) lands on the
size's name, as the papers compare at equal size, by one rule per kind of block (``_matched_size``;
docs/models/index.md#matched-sizes): a model of one mixer per block (Transformer++, SWA, every
memory and kernel family) keeps Table 7's blocks and has its SwiGLU width solved; a hybrid (MAC,
MAG, MAL: attention and a memory in every block) keeps Transformer++'s block widths and has its
number of blocks solved.
"""

from __future__ import annotations

import json

import torch
from transformers.initialization import no_init_weights

from ..layers.common import SwiGLU
from ..ops import UpdateRule
from .config import DeepMemoryConfig
from .modeling import DeepMemoryForCausalLM

# ---- families (Titans §4, ATLAS §5; docs/models/index.md) -------------------------------------
# Each memory family is an UpdateRule (the rule its memory trains by) and the layer's own settings
# (feature map, expansion, gate scale). The chunk size comes from the model size (Gated DeltaNet's
# is 1 at every size).
#
# The inner step of an l2 MLP memory moves its output by about lr * |a|^2 per token, where a is
# the hidden activation (|a|^2 ~ 0.4 * hidden at initialisation) and a chunk applies up to
# chunk_size (times window) gradients taken at its start weights; it must stay below ~2. With
# max_lr 1.0 (gate init lr 0.1) the memory diverges on real text within the first segment
# (OmegaNet's window of 16 even at 0.1); 0.02 keeps every tiny preset finite on real text and
# trained the default run (docs/training.md) without diverging.
#
# The memory LayerNorm, M(x) = x + LN(h(x)) (ATLAS App. E, after Miras), is on for every deep (MLP)
# memory alike, Titans' included, so that a Titans-vs-ATLAS comparison does not measure it: chosen by
# benchmarks/calibrate.py (docs/fidelity.md#calibration). At init h is small (its output matrix
# N(0, 0.01/cols)) and LN rescales it, so one write at max_lr 0.02 closes ~20% of v - M(k) (Gated
# DeltaNet's: 10%), against 0.03% without it; tiny titans-lmm recalls 0.82 of MQAR after 600 steps with
# it, 0.28 without, and 0.41 without it at max_lr 10 under the step bound (which writes 11.6%). A larger
# rate with the LayerNorm overshoots (141% at max_lr 10) and makes bf16 diverge from float32 (logits
# 0.44 relative error), so max_lr stays 0.02; OmegaNet's recall falls from 0.87 to 0.30 at max_lr 30
# (with the LayerNorm or without it: 0.28).
TITANS_RULE = UpdateRule(
    architecture="mlp", depth=2, residual=True, loss="l2", optimizer="momentum", window=1, layer_norm=True
)
TITANS = (TITANS_RULE, dict(expansion=4, feature_map="identity", max_lr=0.02))
# OmegaNet and Atlas: Titans' memory with the Omega window, and the polynomial map with the degree-0
# term of eq. 5 (poly_constant)
OMEGA = (
    TITANS_RULE.replace(window=16),
    dict(TITANS[1], feature_map="polynomial", poly_degree=2, poly_constant=True),
)
# Muon per token, as ATLAS §5.1 (eq. 40-41) trains it: every token's momentum orthogonalised and
# read by the tokens after it in its chunk (granularity="chunk", one update per chunk, is the cheaper
# ablation; docs/models/atlas.md). Muon's step is lr times an orthogonalised matrix (spectral norm
# ~1): bounded, so max_lr stays at 1.0.
ATLAS_RULE = OMEGA[0].replace(optimizer="muon", ns_steps=5, granularity="token")
ATLAS = (ATLAS_RULE, dict(OMEGA[1], max_lr=1.0))
ATLAS_PP = (ATLAS_RULE.replace(architecture="gated_mlp"), ATLAS[1])
# Gated DeltaNet: the gated delta rule exactly online (forget, then the delta step, at every token;
# chunk_size 1 in the WY form of ops/delta.py) with Mamba-2's log-decay gate and beta = sigmoid (max_lr 1),
# in the paper's and flash-linear-attention's head layout: values twice as wide as keys (expand_v 2),
# queries and keys 0.75 x hidden in heads of 256 (_gdn_heads)
GATED_DELTANET = (
    UpdateRule(
        architecture="linear", residual=False, loss="l2", optimizer="gd", window=1, chunk_size=1, decay_first=True
    ),
    dict(use_decay=True, decay_gate="mamba2", feature_map="identity", expand_v=2),
)
# DLA: the memory LayerNorm as every deep memory, with max_lr 0.02 (benchmarks/calibrate.py). The
# Hebbian step has no error term to stop it: at max_lr 1 without the LayerNorm the read reached inf
# within 2048 tokens of text at init, and one write closed 0.2% of v - M(k) (the residual memory
# reads k back, which a dot-loss step never removes). With it, max_lr 0.02 writes 27% and streams text
# finite; max_lr 1 with it writes 99% and puts bf16 logits 0.21 off float32 (0.02-0.03 at 0.02).
DLA = (
    UpdateRule(architecture="mlp", depth=2, residual=True, loss="dot", optimizer="gd", window=1, layer_norm=True),
    dict(expansion=4, use_decay=True, feature_map="polynomial", poly_degree=2, poly_constant=True, max_lr=0.02),
)
SWLA = (
    UpdateRule(architecture="linear", residual=False, loss="dot", optimizer="gd", window=16),
    dict(use_decay=True, feature_map="identity"),
)
NO_MEMORY = None

# SWDT and Dot: the Omega rule of ATLAS eq. 27-28 in kernel form (window_rule="omega", the paper's
# unnormalised read), with the Omega window c = 16 of OmegaNet and Atlas: every step re-applies the
# window's gradients and tokens never leave the memory, so c is the rule's context, not the reach
# (kernel={"window": "attention", "window_rule": "swa"} gives the deep sliding-window attention).
# The inner step is set by the kernel memory's step bound (tau = 1: a chunk's summed step along
# each matrix's inputs, phi*(k) of norm exp(scale / 2) included, stays below 1), not by max_lr: without it
# the unnormalised forms multiply every step by exp(scale) ~ e^4 at tiny, e^8 at 64-wide heads, and
# the Hebbian deep memory's read grows without bound (SWDT at the former max_lr 1e-4: 6e4 at 8K
# tokens at init, NaN from 1e-3 up; a write closing 0.006% of the residual). With the bound, max_lr
# 1.0 (the layer's default, as the DeepTransformer's) writes 25% of v per write at init for both, at
# every head width, and both stay finite on text (benchmarks/results/kernel_stability.txt;
# docs/models/deep-transformer.md).
SWDT = dict(loss="dot", window=16, window_rule="omega", normalized=False, max_lr=1.0, step_bound=1.0)
DOT = dict(loss="l2", window=16, window_rule="omega", normalized=False, max_lr=1.0, step_bound=1.0)

# name -> (block of every layer, (rule, layer settings) or None, kernel settings); a kernel window of
# None is global (DeepTransformer); "attention" would borrow the size's sliding window.
Memory = tuple[UpdateRule, dict] | None
PRESETS: dict[str, tuple[str, Memory, dict]] = {
    "transformer": ("attn", NO_MEMORY, {}),
    "swa": ("swa", NO_MEMORY, {}),
    "gated-deltanet": ("memory", GATED_DELTANET, {}),
    "titans-lmm": ("memory", TITANS, {}),
    "titans-mac": ("mac", TITANS, {}),
    "titans-mag": ("mag", TITANS, {}),
    "titans-mal": ("mal", TITANS, {}),
    "omeganet": ("memory", OMEGA, {}),
    "atlas": ("memory", ATLAS, {}),
    "atlas-pp": ("memory", ATLAS_PP, {}),
    "atlas-mag": ("mag", ATLAS, {}),
    "atlas-mal": ("mal", ATLAS, {}),
    "dla": ("memory", DLA, {}),
    "swla": ("memory", SWLA, {}),
    "deep-transformer": ("kernel", NO_MEMORY, dict(loss="dot", window=None, step_bound=1.0)),
    "swdt": ("kernel", NO_MEMORY, SWDT),
    # Dot is ATLAS's Deep Omega Transformer (eq. 27): the l2 loss, not the dot-product one
    "dot": ("kernel", NO_MEMORY, DOT),
}

# the memory-only presets whose paper model has persistent tokens (the hybrids all do): Titans'
# LMM, the base of its ablations (Titans §5.9, Table 5), reads them before the sequence
PERSISTENT_MEMORY = ("titans-lmm",)

# size -> (config fields, parameter target or None). Tiny runs forward+backward on a CPU in
# seconds; tiny-w16 is tiny with 16-token attention windows and MAC segments, for recall tasks of
# 64 to thousands of tokens where attention must not cover the task (memory carries the long range);
# the others are ATLAS Table 7 with the library's paper-size defaults for windows and segments
# (docs/models/index.md).
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    attention_window=64,
    segment_size=64,
    num_persistent=4,
    chunk_size=16,
)
SIZES: dict[str, tuple[dict, float | None]] = {
    "tiny": (TINY, None),
    "tiny-w16": (dict(TINY, attention_window=16, segment_size=16), None),
    "170m": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=16), 170e6),
    "340m": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16), 340e6),
    "760m": (dict(hidden_size=1536, num_hidden_layers=24, num_attention_heads=16), 760e6),
    "1.3b": (dict(hidden_size=2048, num_hidden_layers=18, num_attention_heads=8), 1.3e9),
}
PAPER_DEFAULTS = dict(vocab_size=32000, attention_window=2048, segment_size=512, num_persistent=16, chunk_size=64)
# Degree-2 features of a d-wide key have d + d(d+1)/2 channels and every head learns its initial
# memory over them: at d = 256 (1.3b's 8 heads) that alone would be billions of parameters, so
# the polynomial presets use 32-wide heads at the paper sizes (hidden / 32 heads).
POLY_HEAD_DIM = 32
GDN_HEAD_DIM = 256  # Gated DeltaNet's head width (flash-linear-attention, the paper's 1.3B: 6 heads at 2048)
MLP_MULTIPLE = 64  # solved SwiGLU widths are rounded to this


def list_presets() -> tuple[str, ...]:
    return tuple(PRESETS)


def list_sizes() -> tuple[str, ...]:
    return tuple(SIZES)


def _config_fields() -> tuple[str, ...]:
    return DeepMemoryConfig.own_fields()  # (Hugging Face's base fields are no preset's to set)


def _family_fields(name: str, size: str) -> dict:
    block, memory, kernel = PRESETS[name]
    fields, target = SIZES[size]
    fields = dict(fields)
    if target is not None:  # a paper size
        fields = dict(PAPER_DEFAULTS, **fields)
    chunk_size = fields.pop("chunk_size")
    if block not in ("mac", "mag", "mal") and name not in PERSISTENT_MEMORY:
        fields["num_persistent"] = 0
    if memory is not None:
        rule, layer = memory
        # the size's chunk size, except for a rule that forgets first: that is online by definition
        # (chunk_size 1), and fast without chunks
        memory = dict((rule if rule.decay_first else rule.replace(chunk_size=chunk_size)).to_dict(), **layer)
    else:
        memory = {}
    if kernel:
        kernel = dict(kernel, chunk_size=chunk_size)
    if memory.get("feature_map") == "polynomial" and target is not None:
        fields.update(head_dim=POLY_HEAD_DIM, num_attention_heads=fields["hidden_size"] // POLY_HEAD_DIM)
    if PRESETS[name][1] is GATED_DELTANET:
        fields.update(_gdn_heads(fields["hidden_size"], fields["num_attention_heads"], target is not None))
    return dict(fields, layer_pattern=block, memory=memory, kernel=kernel)


def _gdn_heads(hidden: int, heads: int, paper_size: bool) -> dict:
    """Gated DeltaNet's heads: queries and keys ``0.75 hidden`` wide in all (values ``1.5 hidden``
    through ``expand_v=2``), at the paper sizes in heads of ``GDN_HEAD_DIM`` = 256 where ``0.75 hidden
    / 256`` is whole (340m: 3, 1.3b: 6), else the nearest whole number of heads (170m, 760m: heads of
    288); at tiny the size's heads (4 of 12)."""
    width = 3 * hidden // 4
    if paper_size:
        heads = max(1, round(width / GDN_HEAD_DIM))
    if width % heads:
        raise ValueError(f"gated-deltanet: 0.75 x hidden_size = {width} is not a whole number of {heads} heads")
    return dict(num_attention_heads=heads, head_dim=width // heads)


def preset_config(name: str, size: str = "tiny", **overrides) -> DeepMemoryConfig:
    """The :class:`DeepMemoryConfig` of preset ``name`` at ``size``. ``overrides`` replace config
    fields; ``memory=`` / ``kernel=`` dicts are merged into the preset's settings."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    valid = _config_fields()
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for preset {name!r}; valid fields: {', '.join(valid)}")
    fields = _family_fields(name, size)
    for key in ("memory", "kernel"):
        if key in overrides:
            extra = overrides.pop(key)
            if not isinstance(extra, dict):
                raise TypeError(f"{key} override must be a dict of settings; got {type(extra).__name__}")
            fields[key] = dict(fields[key], **extra)
    for alias, field in DeepMemoryConfig.attribute_map.items():
        if alias in overrides:
            overrides[field] = overrides.pop(alias)
    fields.update(overrides)
    if fields["kernel"].get("window") == "attention":
        fields["kernel"]["window"] = fields["attention_window"]
    target = SIZES[size][1]
    if target is not None:
        fields.update(_matched_size(fields, size, overrides, target))
    return DeepMemoryConfig(**fields)


HYBRID_BLOCKS = ("mac", "mag", "mal")


def _matched_size(fields: dict, size: str, overrides: dict, target: float) -> dict:
    """The SwiGLU width and number of blocks that bring a paper-size preset to ``target``
    parameters (docs/models/index.md#matched-sizes), each unless ``overrides`` gives it:

    - one mixer per block (``attn``, ``swa``, ``memory``, ``kernel``, or any list ``layer_pattern``):
      ATLAS Table 7's blocks, the SwiGLU width solved for this model;
    - a hybrid (``mac``, ``mag``, ``mal``: attention and a memory in every block): Transformer++'s
      SwiGLU width at this size, the number of blocks solved (solving its width instead would leave a
      vestigial MLP: 215 channels for ``titans-mac`` at 340m, 8% of Transformer++'s).
    """
    sized = {}
    hybrid = isinstance(fields["layer_pattern"], str) and fields["layer_pattern"] in HYBRID_BLOCKS
    if hybrid and "num_hidden_layers" not in overrides:
        if "intermediate_size" not in overrides:
            shared = {k: v for k, v in overrides.items() if k not in ("memory", "kernel", "layer_pattern")}
            sized["intermediate_size"] = _solve_mlp_width(dict(_family_fields("transformer", size), **shared), target)
        sized["num_hidden_layers"] = _solve_blocks(dict(fields, **sized), target)
    elif "intermediate_size" not in overrides:
        sized["intermediate_size"] = _solve_mlp_width(fields, target)
    return sized


_WIDTHS: dict[str, int] = {}
_BLOCKS: dict[str, int] = {}


def _key(fields: dict, solved: str) -> str:
    return json.dumps({k: v for k, v in fields.items() if k != solved}, sort_keys=True, default=str)


def count_parameters(config: DeepMemoryConfig) -> tuple[int, int]:
    """``(total, swiglu)`` parameter counts of a model, built on the meta device (no memory)."""
    with torch.device("meta"), no_init_weights():  # initialising meta tensors is wasted time
        model = DeepMemoryForCausalLM(config)
    model.tie_weights()
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for m in model.modules() if isinstance(m, SwiGLU) for p in m.parameters())
    return total, mlp


def _solve_mlp_width(fields: dict, target: float) -> int:
    # the count is affine in the SwiGLU width: total = rest + 3 * hidden * width * n_mlp
    key = _key(fields, "intermediate_size")
    if key not in _WIDTHS:
        probe = 4 * fields["hidden_size"]
        total, mlp = count_parameters(DeepMemoryConfig(**dict(fields, intermediate_size=probe)))
        if mlp == 0:
            raise ValueError("cannot size a model without SwiGLU blocks to a parameter target; pass intermediate_size")
        per_unit = mlp / probe
        width = (target - (total - mlp)) / per_unit
        width = int(round(width / MLP_MULTIPLE)) * MLP_MULTIPLE
        if width < MLP_MULTIPLE:
            raise ValueError(
                f"{total - mlp:,} parameters outside the MLPs already exceed the target {target:,.0f}; "
                "pass intermediate_size (or smaller memory settings)"
            )
        _WIDTHS[key] = width
    return _WIDTHS[key]


def _solve_blocks(fields: dict, target: float) -> int:
    # a uniform layer pattern's count is affine in the number of blocks: total = rest + n * per_block
    key = _key(fields, "num_hidden_layers")
    if key not in _BLOCKS:
        one, two = (count_parameters(DeepMemoryConfig(**dict(fields, num_hidden_layers=n)))[0] for n in (1, 2))
        per_block, rest = two - one, 2 * one - two
        blocks = int(round((target - rest) / per_block))
        if blocks < 1:
            raise ValueError(
                f"one block of {per_block:,} parameters and {rest:,} outside the blocks exceed the target "
                f"{target:,.0f}; pass num_hidden_layers"
            )
        _BLOCKS[key] = blocks
    return _BLOCKS[key]


def build(name: str, size: str = "tiny", **overrides):
    """``DeepMemoryForCausalLM`` of preset ``name`` at ``size`` (see :func:`preset_config`)."""
    return DeepMemoryForCausalLM(preset_config(name, size, **overrides))
