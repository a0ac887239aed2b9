"""Names of MindFormers Llama cells in Hugging Face's Llama (as HF PEFT sees them)."""

# MindFormers legacy Llama cell name -> HF Llama module name (last one or two parts).
MF_TO_HF_LLAMA = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def hf_module_name(mf_name: str) -> str:
    """``model.layers.0.attention.wq`` -> ``model.layers.0.self_attn.q_proj``; others unchanged."""
    for mf_suffix, hf_suffix in MF_TO_HF_LLAMA.items():
        if mf_name == mf_suffix or mf_name.endswith("." + mf_suffix):
            return mf_name[: len(mf_name) - len(mf_suffix)] + hf_suffix
    return mf_name
