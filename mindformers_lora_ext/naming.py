"""Names of MindFormers Llama cells in Hugging Face's Llama (as HF PEFT sees them), both ways."""
from typing import Dict

# MindFormers legacy Llama cell name -> HF Llama module name (the trailing components).
MF_TO_HF_LLAMA: Dict[str, str] = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "model.tok_embeddings": "model.embed_tokens",
    "model.norm_out": "model.norm",
}
HF_TO_MF_LLAMA: Dict[str, str] = {hf: mf for mf, hf in MF_TO_HF_LLAMA.items()}


def _rename(name: str, table: Dict[str, str]) -> str:
    for old, new in table.items():
        if name == old or name.endswith("." + old):
            return name[: len(name) - len(old)] + new
    return name


def hf_module_name(mf_name: str) -> str:
    """``model.layers.0.attention.wq`` -> ``model.layers.0.self_attn.q_proj``; others unchanged."""
    return _rename(mf_name, MF_TO_HF_LLAMA)


def mf_module_name(hf_name: str) -> str:
    """Inverse of :func:`hf_module_name`."""
    return _rename(hf_name, HF_TO_MF_LLAMA)


TOKEN_ROWS = "trainable_tokens_delta"
TOKEN_ADAPTER = "token_adapter"  # PEFT's module holding trainable token rows under an embedding


def hf_parameter_name(mf_param: str) -> str:
    """``model.tok_embeddings.embedding_weight``-style names of whole cells kept by
    ``modules_to_save``: the cell part renamed, the attribute kept except Llama's embedding;
    trainable token rows go under PEFT's ``token_adapter``."""
    cell, _, attr = mf_param.rpartition(".")
    if attr == TOKEN_ROWS:
        return f"{hf_module_name(cell)}.{TOKEN_ADAPTER}.{attr}"
    attr = "weight" if attr == "embedding_weight" else attr
    return f"{hf_module_name(cell)}.{attr}" if cell else attr


def mf_parameter_name(hf_param: str) -> str:
    """Inverse of :func:`hf_parameter_name`."""
    cell, _, attr = hf_param.rpartition(".")
    if attr == TOKEN_ROWS and cell.endswith("." + TOKEN_ADAPTER):
        return f"{mf_module_name(cell[: -len(TOKEN_ADAPTER) - 1])}.{attr}"
    mf_cell = mf_module_name(cell)
    if mf_cell.endswith("tok_embeddings") and attr == "weight":
        attr = "embedding_weight"
    return f"{mf_cell}.{attr}" if cell else attr
