"""The small Retro model section the model tests share: 3 layers, hidden 32, chunk 8,
CCA in layers 2 and 3, SwiGLU, LayerNorm-1p, biases, half-head RoPE, no dropout."""

SMALL_SECTION = dict(
    arch="retro",
    num_layers=3,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    seq_length=32,
    chunk_length=8,
    num_neighbors=2,
    num_retrieved_chunks=2,
    encoder_num_layers=2,
    cca_layers=[2, 3],
    hidden_dropout=0.0,
    attention_dropout=0.0,
    encoder_hidden_dropout=0.0,
    encoder_attention_dropout=0.0,
    swiglu=True,
    apply_layernorm_1p=True,
    add_bias_linear=True,
    rotary_percent=0.5,
)
# The same with separate input and output embeddings (what the released models use).
UNTIED_SECTION = {**SMALL_SECTION, "untie_embeddings_and_output_weights": True}
