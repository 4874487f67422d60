"""Text tokenizers: a WordPiece vocabulary learnt offline, a pretrained one from local files, and the
round trip through the checkpoint (a dict of file name -> text)."""

import json
import tempfile
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mtmm.errors import UserError
from mtmm.hub import offline

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# The files a checkpoint may carry to rebuild its tokenizer: what save_pretrained writes for the tokenizers mtmm
# uses. Plain names only: a name from a checkpoint never chooses a folder.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"})


def train_wordpiece(texts: list[str], vocab_size: int = 2000, lowercase: bool = True) -> PreTrainedTokenizerBase:
    """A BERT-style WordPiece tokenizer whose vocabulary is learnt from `texts` (the training split), offline.

    The vocabulary is every character seen (as a word start and as a "##" continuation, so no word is ever
    [UNK]) plus the most frequent whole words, ties broken alphabetically. We build it ourselves rather than
    with tokenizers' WordPieceTrainer because that trainer breaks ties in hash-map order: the same texts gave a
    different vocabulary on each run, and so different metrics for the same seed.
    """
    if not texts:
        raise UserError("cannot learn a WordPiece vocabulary: the training split has no texts")
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({char for word in counts for char in word})
    vocab = SPECIAL_TOKENS + characters + ["##" + char for char in characters]
    known = set(vocab)
    by_frequency = sorted((word for word in counts if word not in known), key=lambda word: (-counts[word], word))
    vocab += by_frequency[: max(0, vocab_size - len(vocab))]

    # A generous max_input_chars_per_word: WordPiece's default (100) turns any longer word into [UNK].
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]",
                                           max_input_chars_per_word=10_000))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_pretrained_tokenizer(name: str, texts: list[str] | None = None,
                              trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a pretrained model, from a local directory or the local Hugging Face cache.
    `texts` is unused (a pretrained vocabulary is fixed); it keeps the signature of train_wordpiece. Custom code
    shipped with the model runs only with trust_remote_code=true, set by the user; never a prompt."""
    try:
        offline()
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as error:
        if "custom code" in str(error) or "trust_remote_code" in str(error):
            raise UserError(custom_code_message(name)) from None
        raise UserError(missing_pretrained_message(name, "tokenizer")) from error


def custom_code_message(name: str, modality: str = "text") -> str:
    return (f"{name!r} ships its own Python code (auto_map), which mtmm runs only when you set "
            f"encoder.{modality}.trust_remote_code=true for a model whose code you have read and trust")


def missing_pretrained_message(name: str, what: str, modality: str = "text") -> str:
    files, companion = ("tokenizer files", "AutoTokenizer") if modality == "text" else \
        ("preprocessor_config.json", "AutoImageProcessor")
    return (
        f"could not load the {what} {name!r} offline: it is neither a local directory holding a saved model "
        f"(save_pretrained layout: config.json, model weights, {files}) nor in the local Hugging Face cache. "
        f"Set encoder.{modality}.name=/path/to/model_dir, or on a machine with internet run "
        f"`python -c \"from transformers import AutoModel, {companion} as T; "
        f"AutoModel.from_pretrained('{name}'); T.from_pretrained('{name}')\"` to fill the cache (HF_HOME) and copy it here"
    )


def tokenizer_to_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """Every file save_pretrained writes, as text, so the checkpoint alone can rebuild the tokenizer."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_text(encoding="utf-8") for path in sorted(Path(folder).iterdir()) if path.is_file()}


def tokenizer_from_files(files: dict[str, str], source: str = "checkpoint") -> PreTrainedTokenizerBase:
    """Rebuild a tokenizer from the files a checkpoint (`source`, named in errors) carries. They come from outside:
    only the plain file names of TOKENIZER_FILES, text values, and no custom code (never honoured, never a prompt)."""
    if not isinstance(files, dict) or not files:
        raise UserError(f"{source}: its tokenizer files are missing or not a mapping of file names to text")
    for name, text in files.items():
        if not isinstance(name, str) or name not in TOKENIZER_FILES:
            raise UserError(f"{source}: tokenizer file name {name!r} is not allowed; a checkpoint may carry only "
                            f"the plain names {sorted(TOKENIZER_FILES)}")
        if not isinstance(text, str):
            raise UserError(f"{source}: tokenizer file {name} is not text")
    refuse_custom_code(files, source)
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        try:
            offline()
            return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{source}: its tokenizer files cannot be loaded ({str(error).splitlines()[0][:200]})"
                            ) from None


def refuse_custom_code(files: dict[str, str], source: str) -> None:
    """A tokenizer_config.json that asks for code of its own (auto_map, trust_remote_code) is refused."""
    if "tokenizer_config.json" not in files:
        return
    try:
        config = json.loads(files["tokenizer_config.json"])
    except json.JSONDecodeError as error:
        raise UserError(f"{source}: tokenizer file tokenizer_config.json is not valid JSON ({error.msg})") from None
    if not isinstance(config, dict):
        raise UserError(f"{source}: tokenizer file tokenizer_config.json is not a JSON object")
    for key in ("auto_map", "trust_remote_code"):
        if key in config:
            raise UserError(f"{source}: tokenizer_config.json asks for custom code ({key!r}); mtmm never runs code "
                            f"from a checkpoint")
