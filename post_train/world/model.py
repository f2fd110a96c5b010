"""The demo world's tokenizer and tiny Llama configuration.

Kept apart from the data code so that generating data does not import transformers.

A note on transformers 5 (checked with 5.23): `apply_chat_template(..., tokenize=True)`
returns a `BatchEncoding` with `input_ids` and `attention_mask`, not a bare list of
ids as in 4.x; read `["input_ids"]`. With `return_dict=True,
return_assistant_tokens_mask=True` it also returns `assistant_masks`, which our
template supports through its `{% generation %}` block (TRL's `assistant_only_loss`).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from post_train.world.families import FAMILIES, LETTERS

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)

# Each message is its role token, its content and <|end|>. Because the role tokens are
# special, the content is tokenized on its own, so a prompt rendered with
# add_generation_prompt is a token-exact prefix of the prompt plus its response.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Metaspace turns each space into this marker and splits before it, so every
# space-separated symbol is a word of its own and decoding restores the spaces.
SPACE_MARKER = "\u2581"


def _world_characters() -> list[str]:
    """Every character a world string can contain, so none of them ever becomes <|unk|>."""
    # Pretraining verbs are lowercase, so the letters cover them; instructions add capitals.
    instructions = "".join(family.instruction for family in FAMILIES.values())
    return sorted(set(LETTERS + ":=" + instructions) - {" "})


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on world texts (see `iter_world_texts`).

    Every letter used as a standalone symbol in `texts` becomes a single token; raises
    ValueError when `vocab_size` is too small for that.
    """
    corpus = list(texts)
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_MARKER, prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement=SPACE_MARKER, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_world_characters(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    _check_symbols_are_single_tokens(tokenizer, corpus, vocab_size)
    return tokenizer


def _check_symbols_are_single_tokens(tokenizer: PreTrainedTokenizerFast, corpus: list[str], vocab_size: int) -> None:
    symbols = {word for text in corpus for word in text.split() if len(word) == 1 and word in LETTERS}
    split_symbols = sorted(symbol for symbol in symbols if len(tokenizer.encode(symbol)) != 1)
    if split_symbols:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: symbols {split_symbols} are not single tokens; "
            "raise vocab_size so BPE can merge them"
        )


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
) -> LlamaConfig:
    """A small Llama (about 1M parameters at the defaults) matched to `tokenizer`.

    `intermediate_size` defaults to 4 * hidden_size, the classic transformer ratio.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
