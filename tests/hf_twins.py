"""Test-side HF twins of the tiny MindFormers models: the same base weights in transformers (torch
CPU) and in MindFormers, the HF weights converted by MindFormers' own HF converters.

* legacy Llama (configs/tiny/lora_ext.yaml): ``mindformers.models.llama.convert_weight.name_replace``
  (the names its HF -> MindSpore script uses; HF checkpoints need no q/k permutation there);
* mcore Qwen3 / Qwen3-MoE (configs/tiny/qwen3*_lora_ext.yaml): the model's
  ``convert_weight_dict`` (q/k/v and gate/up fused in the model's own layout, experts stacked).

:func:`build_pair` gives a :class:`Pair`; MindFormers networks are built and run inside the
pair's context (mcore: the CPU stand-ins and float32 attention, see conftest).
"""
import contextlib
import os
from dataclasses import dataclass, field

import numpy as np

from conftest import ROOT, float32_attention, mcore_mode

CONFIGS = {"llama": "lora_ext.yaml", "qwen3": "qwen3_lora_ext.yaml", "qwen3_moe": "qwen3_moe_lora_ext.yaml"}


def _yaml(kind):
    from mindformers.tools.register import MindFormerConfig  # pylint: disable=import-outside-toplevel
    return MindFormerConfig(os.path.join(ROOT, "configs", "tiny", CONFIGS[kind]))


def _hf_config(kind, mc, ffn):
    import transformers  # pylint: disable=import-outside-toplevel
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=ffn,
            num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_heads,
            rms_norm_eps=mc.rms_norm_eps, rope_theta=10000.0, max_position_embeddings=mc.seq_length,
            tie_word_embeddings=False, attn_implementation="eager")
    common = dict(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
                  num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
                  num_key_value_heads=mc.num_key_value_heads, head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps,
                  rope_theta=mc.rope_theta, max_position_embeddings=mc.max_position_embeddings,
                  tie_word_embeddings=False, attention_bias=False, attn_implementation="eager")
    if kind == "qwen3":
        return transformers.Qwen3Config(**common)
    return transformers.Qwen3MoeConfig(**common, num_experts=mc.num_experts, num_experts_per_tok=mc.num_experts_per_tok,
                                       moe_intermediate_size=mc.moe_intermediate_size, norm_topk_prob=mc.norm_topk_prob,
                                       decoder_sparse_step=1, mlp_only_layers=[])


def hf_logits(model, input_ids) -> np.ndarray:
    """[B, S, V] float32 logits of a transformers (or PEFT) model."""
    import torch  # pylint: disable=import-outside-toplevel
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(input_ids, np.int64))).logits.float().numpy()


@dataclass
class Pair:
    """One tiny model in both frameworks with identical base weights."""

    kind: str
    hf_model: object
    mf_weights: dict  # MindFormers parameter name -> float32 array
    input_ids: np.ndarray = field(default=None)

    @contextlib.contextmanager
    def context(self):
        if self.kind == "llama":
            yield
            return
        with mcore_mode(), float32_attention():
            yield

    def mf_network(self, pet=None):
        """The tiny MindFormers network (with ``pet``, merged over the YAML's pet_config; None:
        the plain base) holding the twin's base weights; adapters load from ``adapter_path``."""
        # pylint: disable=import-outside-toplevel
        import mindspore as ms
        from mindformers.models.build_model import build_network
        from mindformers.tools.register import MindFormerConfig
        cfg = _yaml(self.kind)
        yaml_pet = dict(cfg.model.model_config.pet_config)
        if pet is None:
            del cfg.model.model_config["pet_config"]
        else:
            keep = {"target_modules": yaml_pet.get("target_modules")}
            cfg.model.model_config.pet_config = MindFormerConfig(**dict(keep, **pet))
        with self.context():
            ms.set_seed(0)
            net = build_network(cfg.model)
            params = {n: ms.Parameter(ms.Tensor(v), name=n) for n, v in self.mf_weights.items()}
            not_loaded, unused = ms.load_param_into_net(net, params)
        base_left = [n for n in not_loaded if not _is_adapter_param(n)]
        assert not base_left and not unused, (base_left, unused)
        if pet is not None and pet.get("adapter_path"):  # loaded at build, before the base: load again
            from mindformers_lora_ext.peft_format import load_adapter
            load_adapter(net.network, pet["adapter_path"])
        return net

    def mf_logits(self, net) -> np.ndarray:
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        with self.context():
            net.set_train(False)
            out = net(ms.Tensor(self.input_ids.astype(np.int32)))
        out = (out[0] if isinstance(out, (tuple, list)) else out).asnumpy()
        return out.reshape(self.input_ids.shape + (-1,))


# MindFormers-only state HF has no weight for: the MoE router's load accumulator (zeros)
MF_ONLY = ("fi_accu",)


def _is_adapter_param(name):
    attr = name.rsplit(".", 1)[-1]
    return attr.startswith(("lora_", "hada_", "lokr_", "vera_")) or attr in ("adapter_active", "trainable_tokens_delta") + MF_ONLY


def build_pair(kind, seed=0) -> Pair:
    """The HF twin of tiny ``kind`` (llama, qwen3, qwen3_moe), random with ``seed``, and its
    weights in MindFormers' names by MindFormers' converter."""
    # pylint: disable=import-outside-toplevel
    import torch
    import transformers
    mc = _yaml(kind).model.model_config
    pair = Pair(kind, None, {}, np.random.default_rng(seed + 5).integers(3, mc.vocab_size, (2, 32)))
    base = pair.mf_network_shapes = _base_shapes(pair)
    ffn = base["model.layers.0.feed_forward.w1.weight"][0] if kind == "llama" else None
    torch.manual_seed(seed)
    classes = {"llama": transformers.LlamaForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
               "qwen3_moe": transformers.Qwen3MoeForCausalLM}
    model = classes[kind](_hf_config(kind, mc, ffn)).float().eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm weight shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    pair.hf_model = model
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    pair.mf_weights = _to_mindformers(kind, state, pair)
    missing = sorted(n for n in set(base) - set(pair.mf_weights) if not n.endswith(MF_ONLY))
    shapes = {n: (tuple(v.shape), base[n]) for n, v in pair.mf_weights.items() if n in base and tuple(v.shape) != base[n]}
    assert not missing and not shapes, (missing[:5], shapes)
    pair.mf_weights = {n: v for n, v in pair.mf_weights.items() if n in base}
    return pair


def _base_shapes(pair):
    net = _plain(pair)
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


def _plain(pair):
    from mindformers.models.build_model import build_network  # pylint: disable=import-outside-toplevel
    cfg = _yaml(pair.kind)
    del cfg.model.model_config["pet_config"]
    with pair.context():
        return build_network(cfg.model)


def _to_mindformers(kind, state, pair):
    if kind == "llama":
        from mindformers.models.llama.convert_weight import name_replace  # pylint: disable=import-outside-toplevel
        return {name_replace(k): v for k, v in state.items()}
    net = _plain(pair)
    with pair.context():
        model = next(c for _, c in net.cells_and_names() if callable(getattr(c, "convert_weight_dict", None)))
        out = model.convert_weight_dict(dict(state))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}
